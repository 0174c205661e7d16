# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install everything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_ARGS ?=

.PHONY: demo test lint install clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	# torch first and alone: an unpinned torch pulled in by a dependency would fetch a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py $(DEMO_ARGS)

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests

lint: install
	$(PY) -m ruff check src tests examples benchmarks brierlm

clean:
	rm -rf $(VENV) outputs
