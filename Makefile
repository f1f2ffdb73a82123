# Two commands on a fresh machine: `make demo` and `make test`. Each creates (or reuses) .venv.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0  # the CPU wheel on these machines; never a CUDA build
	$(BIN)/pip install -q -e '.[test]'
	touch $@

.PHONY: demo test
demo: $(BIN)/.installed
	$(BIN)/tempocache generate "a red circle moves left on a black background" -o demo.gif

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q
