# `make demo` and `make test` work on a fresh clone: they create .venv when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test models bench clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

DEMO_MODEL := models/tiny_resnet.onnx
demo: $(STAMP)
	@mkdir -p out
	$(BIN)/hecompile $(DEMO_MODEL) -o out/tiny_resnet.ir --dump-after all --dump-dir out/dump
	$(BIN)/hecompile $(DEMO_MODEL) -o out/tiny_resnet.dot -q
	$(BIN)/hecompile $(DEMO_MODEL) -o out/tiny_resnet.canonical.onnx -q
	@echo "demo: IR in out/tiny_resnet.ir, DOT in out/tiny_resnet.dot, per-pass snapshots in out/dump/"

test: $(STAMP)
	$(BIN)/python -m pytest tests

models: $(STAMP)
	$(BIN)/python models/build_models.py --out models

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info
