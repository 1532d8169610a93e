"""`import ride_fast.data` stays light: no DALI, no PIL until a loader or a check needs them."""
import subprocess
import sys


def test_data_imports_neither_dali_nor_pil():
    code = (
        "import sys, ride_fast.data, ride_fast.data.dali, ride_fast.data.check, ride_fast.data.verify, ride_fast.data.torch_loader;"
        "from ride_fast.data import build_loaders, ClassBalancedSampler;"
        "bad = [m for m in ('nvidia.dali', 'PIL') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
