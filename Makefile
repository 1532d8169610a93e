# Quick start:  make demo   (set up, then train + evaluate the MNIST-LT demo on the CPU)
#               make test   (set up, then run the test suite)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= demo_out

.PHONY: setup demo test bench clean

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

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .benchmarks
