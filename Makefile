# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# On a machine without an NVIDIA GPU pin the CPU build of torch; a bare `torch` pulls a multi-GB CUDA build.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_PIN := $(if $(HAS_GPU),torch,torch==2.13.0)

.PHONY: demo test test-fast install clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,demo,hf]"
	touch $@

install: $(VENV)/.installed

# Trains the tiny preset on CPU with TP=2 x PP=2 (4 processes), then reports zero-shot accuracy.
demo: install
	PYTHON=$(abspath $(PY)) bash examples/pretrain_m2_tiny.sh

# The whole suite, slow tests included (this is what .ci/run calls).
test: install
	$(PY) -m pytest -q -W ignore::UserWarning tests

test-fast: install
	$(PY) -m pytest -q -W ignore::UserWarning -m "not slow" tests

clean:
	rm -rf $(VENV) runs build *.egg-info
