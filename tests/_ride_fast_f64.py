"""`ride-fast` with float64 as the default dtype: for tests that compare runs whose float32 results
would differ by rounding alone (e.g. one process vs two ranks). Usage: python _ride_fast_f64.py ARGS."""
import sys

import torch

torch.set_default_dtype(torch.float64)

from ride_fast.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
