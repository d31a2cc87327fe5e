# Two entry points: `make demo` (the main job) and `make test` (ruff, pytest with the type checks,
# doctests). Each creates .venv if missing and installs the CPU build of torch==2.13.0 first, so a
# plain `torch` requirement never pulls a multi-GB CUDA build; the package itself asks for torch>=2.13.
# `make docs` builds the documentation site into site/ (CI runs it after `make test`).
# Both install the `dev`, `bench`, `ode` and `models` extras: the CLI tests run the benchmark
# (rich, matplotlib), the flows tests and examples solve ODEs (torchdiffeq), the type checks need
# mypy and basedpyright, the U-Net tests and the diffusion example build diffusers models,
# the flow tests zuko's CNF, the torchsde tests torchsde's solvers, the einops models einops.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.torchdiv-installed
DOCS_STAMP := $(VENV)/.torchdiv-docs-installed

# On Linux, PyPI's torch wheel is the CUDA build and the CPU build (version 2.13.0+cpu) is on
# PyTorch's CPU index; elsewhere PyPI's wheel is the CPU build. Where that index cannot be reached
# but a local wheel of the same version is configured for pip (find-links), pip warns once and
# takes the local wheel. Only torch comes from that index (--no-deps); its dependencies come from
# PyPI in the second step, which keeps torch as it is.
TORCH_INDEX := https://download.pytorch.org/whl/cpu
TORCH := torch==2.13.0$(if $(filter Linux,$(shell uname -s)),+cpu)

# OpenMP threads that spin while waiting stall when another process holds a core: on a busy 2-core
# machine the tests and the loop recipes ran several times slower. Passive waiting keeps the tests
# and the demo sane there (override: make demo OMP_WAIT_POLICY=ACTIVE).
OMP_WAIT_POLICY ?= PASSIVE
export OMP_WAIT_POLICY

.PHONY: test demo bench lint docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --no-deps --retries 1 --extra-index-url $(TORCH_INDEX) '$(TORCH)'
	$(PIP) install --quiet '$(TORCH)' -e '.[dev,bench,ode,models]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples docs/_hooks.py
	$(VENV)/bin/ruff format --check src tests bench examples docs/_hooks.py

# The tests in PYTEST_WORKERS processes (pytest-xdist): one process kept one core busy, the other
# only for the type checkers' first ~40 s. On the shared 2-core VM, with 3-4 other processes
# running, two workers took 78-85% of one process's wall time (2026-12-05); on an
# idle machine they get both cores. `make test PYTEST_WORKERS=0`: one process.
PYTEST_WORKERS ?= 2

test: lint
	$(PY) -m pytest -n $(PYTEST_WORKERS)

# The quick benchmark suite: a table here, every figure in DEMO_OUT.json, the picture in DEMO_OUT.png.
DEMO_OUT := bench/results/demo

demo: $(STAMP)
	$(PY) -m torchdiv bench --json $(DEMO_OUT).json --plot $(DEMO_OUT).png

bench: $(STAMP)
	$(PY) bench/divergence_exact.py

# The site: mkdocs with the material theme, the API reference by mkdocstrings from the
# docstrings. Strict: a warning (a broken link or anchor, an unresolved API name, a docstring
# parameter not in the signature) fails the build. The `docs` extra is installed on top of the
# test set-up, with torch pinned as it is.
$(DOCS_STAMP): $(STAMP)
	$(PIP) install --quiet '$(TORCH)' -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) build site src/*.egg-info .pytest_cache .ruff_cache .mypy_cache
