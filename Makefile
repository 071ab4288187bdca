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

.PHONY: setup clip-benchmark demo test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# CLIP_benchmark 1.6.2, the reference the eval tests compare against. Its own requirements would pull
# transformers (and its wds loader breaks on numpy >= 2.4), so it goes into build/ with --no-deps, with
# the only other things it imports (pycocoevalcap; requests is in the venv) and a numpy it accepts; the
# tests put this folder in front of the venv (PYTHONPATH), so it runs on the venv's torch and open_clip.
CLIP_BENCHMARK := $(BUILD)/clip_benchmark
$(CLIP_BENCHMARK)/.installed: $(VENV)/.installed
	$(PY) -m pip install --quiet --no-deps --target $(CLIP_BENCHMARK) "numpy>=2,<2.4" clip_benchmark==1.6.2 pycocoevalcap==1.2
	touch $@

clip-benchmark: $(CLIP_BENCHMARK)/.installed

demo: setup
	$(PY) tools/run_demo.py --out demo_out

test: setup clip-benchmark
	$(PY) -m pytest

clean:
	rm -rf build demo_out
