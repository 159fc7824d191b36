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

DEMO_MODEL := models/tiny_resnet_poly
demo: $(STAMP)
	@mkdir -p out
	$(BIN)/hecompile $(DEMO_MODEL).onnx -o out/demo.hec --dump-after all --dump-dir out/dump
	$(BIN)/hecompile run out/demo.hec --input $(DEMO_MODEL).input.npy --reference $(DEMO_MODEL).onnx -o out/demo.y.npy
	@echo "demo: program out/demo.hec (hecompile inspect out/demo.hec), per-pass IR/DOT snapshots in out/dump/"

test: $(STAMP)
	$(BIN)/python -m pytest tests

models: $(STAMP)
	$(BIN)/python models/build_models.py --out models

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info
