# vlmtrain: `make demo` runs the whole path on generated data; `make test` runs the test suite.
# Both create .venv and install the project first. Every cache lives under build/.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
BUILD := $(CURDIR)/build

export HF_HUB_OFFLINE := 1
export HF_HOME := $(BUILD)/hf
export TORCH_EXTENSIONS_DIR := $(BUILD)/torch_extensions
export RAY_TMPDIR := $(BUILD)/ray
export MPLCONFIGDIR := $(BUILD)/matplotlib

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) tools/run_demo.py --out demo_out

test: setup
	$(PY) -m pytest

clean:
	rm -rf build demo_out
