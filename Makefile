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
	# the editable build prints a setuptools notice about folder layouts (not a deprecation; nothing to act on)
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e ".[test,demo,hf]"
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

# What benchmarks/gpu_check.sh needs on the GPU machine (no network, no megatron-core; maybe no scikit-learn for the
# digits data): the megatron-core wheel for CPython 3.12 x86_64, braceexpand and psutil, and the digits data set +
# tokenizer. Carry the folder there: the device tool's carry: [".gpu_wheels"].
GPU_WHEELS := .gpu_wheels
.PHONY: gpu-wheels
gpu-wheels: install
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
		-d $(GPU_WHEELS) megatron-core==0.16.1 braceexpand==0.1.7 psutil==7.2.2
	$(PY) -m megatron_m2.demo prepare --output-dir $(GPU_WHEELS)/digits
	rm -rf $(GPU_WHEELS)/digits/data/eval
	du -sh $(GPU_WHEELS)
