# `make demo` and `make test` work on a fresh clone: they create .venv when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test models bench clean lattigo calibrate

# The Lattigo backend's shared library (Go, cgo); rebuilt when its Go sources or go.mod/go.sum change.
GO ?= go
LATTIGO_LIB := backends/lattigo/libheclattigo.so
LATTIGO_SRC := $(wildcard backends/lattigo/capi/*.go) go.mod go.sum

$(LATTIGO_LIB): $(LATTIGO_SRC)
	@command -v $(GO) >/dev/null 2>&1 || { echo "error: $(GO) not found; install Go >= 1.22 or set GO=/path/to/go" >&2; exit 1; }
	CGO_ENABLED=1 $(GO) build -buildmode=c-shared -trimpath -buildvcs=false -o $@ ./backends/lattigo/capi

lattigo: $(LATTIGO_LIB)

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

# This machine's op costs and noise (hecompile calibrate, under a minute), which compile reports use;
# measured once per machine (delete the file, or run hecompile calibrate, to measure again).
COST_TABLE := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/hecompiler/cost_seal.json
$(COST_TABLE): | $(STAMP)
	$(BIN)/hecompile calibrate

calibrate: $(STAMP)
	$(BIN)/hecompile calibrate

DEMO_MODEL := models/tiny_resnet_poly
demo: $(STAMP) $(LATTIGO_LIB) $(COST_TABLE)
	@mkdir -p out
	$(BIN)/hecompile $(DEMO_MODEL).onnx -o out/demo.hec --dump-after all --dump-dir out/dump
	$(BIN)/hecompile run out/demo.hec --input $(DEMO_MODEL).input.npy --reference $(DEMO_MODEL).onnx -o out/demo.y.npy
	@echo "demo: program out/demo.hec (hecompile inspect out/demo.hec), per-pass IR/DOT snapshots in out/dump/"

# test files on TEST_WORKERS processes (pytest-xdist; a file's tests stay together, sharing its fixtures)
TEST_WORKERS ?= 2
test: $(STAMP) $(LATTIGO_LIB)
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS) --dist loadfile

models: $(STAMP)
	$(BIN)/python models/build_models.py --out models

bench: $(STAMP) $(LATTIGO_LIB) $(COST_TABLE)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info
	rm -f $(LATTIGO_LIB) $(LATTIGO_LIB:.so=.h)
