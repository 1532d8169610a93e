"""`ride-fast --version`: the package's one version (ride_fast.__version__, which setup.py reads)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ride_fast
from ride_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"ride-fast {ride_fast.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+", ride_fast.__version__)


def test_setup_py_takes_its_version_from_the_package():
    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == ride_fast.__version__
    assert 'version="' not in (ROOT / "setup.py").read_text()  # no second copy of the number
