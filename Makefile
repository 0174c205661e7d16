# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv with the locked stack, the
# exact versions in constraints.txt (`make lock` refreshes them). `make test-latest` and `make test-oldest` build
# throw-away environments with the newest releases pyproject.toml allows and with its lower bounds.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := constraints.txt
# The torch of the locked stack (a CPU wheel of it lies on this project's machines); `make lock` keeps it.
LOCK_TORCH := 2.13.0
FLOORS := build/floor-constraints.txt
DEMO_ARGS ?=
# Extra pytest arguments, e.g. `make test-latest PYTEST_ARGS='-m "not slow"'` for the fast tier only.
PYTEST_ARGS ?=
STACK := '^(torch|transformers|datasets|evaluate|accelerate|huggingface.hub|peft|safetensors|tokenizers)=='

.PHONY: demo test test-fast test-latest test-oldest lock lint install clean docs

# $(call fresh_venv,DIR,PIP_OPTIONS,TORCH): a new virtual environment in DIR; TORCH (a requirement) is installed first
# and alone, because an unpinned torch pulled in by a dependency fetches a multi-GB CUDA build; then the package with
# its dev extras. PIP_OPTIONS (constraints) apply to both installs. Prints the versions of the stack it got.
define fresh_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(if $(3),$(1)/bin/python -m pip install $(2) "$(3)")
	$(1)/bin/python -m pip install $(2) -e ".[dev]"
	$(1)/bin/python -m pip freeze --exclude-editable | grep -iE $(STACK)
endef

# A changed lock rebuilds the environment from scratch, so that nothing outside the lock survives.
$(VENV)/.installed: pyproject.toml setup.py $(LOCK)
	$(call fresh_venv,$(VENV),-c $(LOCK),torch)
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py $(DEMO_ARGS)

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests $(PYTEST_ARGS)

# The quick loop for contributors: everything but the tests marked slow (child processes, torchrun, the demo).
test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

# The newest releases the version ranges allow, torch included (on Linux a CUDA build of several GB), in .venv-latest:
# a new upstream release that breaks the package fails here before a user meets it.
test-latest:
	$(call fresh_venv,.venv-latest,,)
	HF_HUB_OFFLINE=1 .venv-latest/bin/python -m pytest tests $(PYTEST_ARGS)

# The floors: every dependency at the lower bound pyproject.toml declares (tools/floor_constraints.py), torch first;
# what they do not pin resolves to the newest releases compatible with them. In .venv-oldest.
test-oldest:
	mkdir -p $(dir $(FLOORS))
	$(PYTHON) tools/floor_constraints.py > $(FLOORS)
	$(call fresh_venv,.venv-oldest,-c $(FLOORS),torch)
	HF_HUB_OFFLINE=1 .venv-oldest/bin/python -m pytest tests $(PYTEST_ARGS)

# Refresh the lock: torch $(LOCK_TORCH) first, then the newest releases pyproject.toml allows for everything else,
# frozen. Run `make test` and `make demo` on the new lock before committing it.
lock:
	$(call fresh_venv,.venv-lock,,torch==$(LOCK_TORCH))
	@{ \
	  echo "# The tested stack: the exact versions \`make test\` and \`make demo\` install (pip install -c $(LOCK))."; \
	  echo "# Made by \`make lock\` on $$(date -u +%Y-%m-%d) with $$(.venv-lock/bin/python -V): torch==$(LOCK_TORCH) first and alone,"; \
	  echo "# then \`pip install -e .[dev]\` (the newest releases pyproject.toml allows), then \`pip freeze\`; torch's local"; \
	  echo "# version label (+cpu) is dropped, so that the pin matches PyPI's wheels too."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | sed -e 's/^\(torch==[^+]*\)+.*/\1/'; \
	} > $(LOCK)
	rm -rf .venv-lock

# The documentation site (docs/ and the API reference from the docstrings) into build/site; --strict: a broken link,
# anchor or reference fails.
docs: install
	$(PY) -m mkdocs build --strict

lint: install
	$(PY) -m ruff check src tests examples benchmarks brierlm tools

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest .venv-lock build outputs
