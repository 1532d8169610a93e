# Quick start:  make demo   (set up, then train + evaluate the MNIST-LT demo on the CPU)
#               make test   (set up, then run the test suite)
#               make gpu-wheels   (.whl/ for benchmarks/gpu_check.sh on a GPU machine; GPU_PYTHON=3.12)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= demo_out
# the GPU machine's CPython, and what its image may lack (versions: the pins of requirements.txt)
GPU_PYTHON ?= 3.12
GPU_WHEELS := pytest iniconfig pluggy packaging Pygments pytest-benchmark py-cpuinfo2 \
              fvcore iopath yacs tabulate termcolor portalocker PyYAML tqdm pillow

.PHONY: setup demo test bench gpu-wheels clean

$(VENV)/.installed: requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-deps -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/ride-fast demo --out-dir $(OUT)

test: setup
	$(PY) -m pytest -q --benchmark-disable

bench: setup
	$(PY) -m pytest benchmarks -q --benchmark-only

gpu-wheels:
	PYTHON=$(PYTHON) bash benchmarks/gpu_wheels.sh $(GPU_PYTHON) .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .benchmarks
