"""ride_fast: a fast, faithful RIDE (ICLR 2021) training engine for long-tailed recognition."""
import re
from pathlib import Path

from setuptools import find_packages, setup

# one source of truth: ride_fast.__version__ (what `ride-fast --version` prints)
VERSION = re.search(r'^__version__ = "([^"]+)"', (Path(__file__).parent / "ride_fast" / "__init__.py").read_text(), re.M)[1]

setup(
    name="ride_fast",
    version=VERSION,
    description="Fast RIDE (Routing Diverse Distribution-Aware Experts) for long-tailed recognition",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level folder kernels/ but install as `ride_fast_kernels`:
    # PyPI already has a project called `kernels`, so a bare top-level name would clash.
    packages=find_packages(include=["ride_fast", "ride_fast.*"]) + ["ride_fast_kernels"],
    package_dir={"ride_fast_kernels": "kernels"},
    package_data={"ride_fast": ["py.typed", "ops/csrc/*.c", "ops/csrc/*.h"]},
    install_requires=["torch>=2.3", "numpy", "PyYAML", "tqdm", "matplotlib"],
    extras_require={
        "kernels": ["triton>=3.0"],
        "dali": ["nvidia-dali-cuda130>=2.4"],
        "flops": ["fvcore>=0.1.5"],
        "demo": ["mlxtend==0.25.0"],
        "tensorboard": ["tensorboard>=2.14"],
        "test": ["pytest", "pytest-benchmark", "fvcore>=0.1.5", "tensorboard>=2.14"],
    },
    entry_points={"console_scripts": ["ride-fast=ride_fast.cli:main"]},
)
