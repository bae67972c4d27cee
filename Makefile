# The README's two commands: `make demo` (the embedded default run) and `make test` (the whole suite).
# Both create .venv with Python 3.11 and install the three packages editable, with torch pinned to
# the CPU wheel (constraints.txt).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): constraints.txt requirements-dev.txt requirements-nodeps.txt packages/*/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -r requirements-dev.txt \
		-e packages/unisd-core -e packages/unisd-components -e packages/unisd-eval
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

demo: setup
	$(BIN)/unisd train

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check packages tests bench

clean:
	rm -rf $(VENV) runs

# `make ablation`: the sweep in examples/ablation-demo.toml (10 methods x 3 seeds of 20 steps on the demo
# task, two jobs at a time with a core each: 75 minutes on 2 CPU cores; rerun to resume), then its report
# against plain self-distillation. examples/ablation-demo-60.toml is the 60-step version (~4 hours).
.PHONY: ablation
ablation: setup
	$(BIN)/unisd sweep examples/ablation-demo.toml --devices cpu,cpu
	$(BIN)/unisd report runs/ablation-demo --baseline runs/ablation-demo/plain/demo/smollm2-s1 \
		--output runs/ablation-demo/report
