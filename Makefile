# Two entry points: `make demo` (the main job) and `make test` (ruff, pytest, doctests).
# Each creates .venv if missing and installs torch==2.13.0 explicitly (the CPU build), so a
# plain `torch` requirement never pulls a multi-GB CUDA build; the package itself asks for torch>=2.4.
# Both install the `dev`, `bench`, `ode` and `models` extras: the CLI tests run the benchmark
# (rich, matplotlib), the flows tests and examples solve ODEs (torchdiffeq), the U-Net tests
# and the diffusion example build diffusers models.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.torchdiv-installed

.PHONY: test demo bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,bench,ode,models]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples

test: lint
	$(PY) -m pytest

# The quick benchmark suite: a table here, every figure in DEMO_OUT.json, the picture in DEMO_OUT.png.
# OpenMP threads that spin while waiting stall when another process holds a core: on a busy 2-core
# machine the loop of autograd.grad ran 100x slower. Passive waiting keeps the demo sane there
# (override: make demo OMP_WAIT_POLICY=ACTIVE).
DEMO_OUT := bench/results/demo
OMP_WAIT_POLICY ?= PASSIVE

demo: $(STAMP)
	OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) $(PY) -m torchdiv bench --json $(DEMO_OUT).json --plot $(DEMO_OUT).png

bench: $(STAMP)
	$(PY) bench/divergence_exact.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
