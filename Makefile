# hdlm-kernels: `make test` runs the test suite, `make bench` the benchmarks.
# Both start from a clean clone: they create .venv (which sees the system site-packages),
# install torch only when none is importable (the CPU wheel torch==2.13.0; a CUDA torch
# already on a GPU machine is kept), triton (--no-deps) only when missing, then the package.
# On an offline GPU machine with torch, triton, pytest and hypothesis preinstalled, nothing
# that is already present is installed again.

PYTHON       ?= python3
VENV         ?= .venv
PY           := $(VENV)/bin/python
TORCH_CPU    ?= torch==2.13.0
TRITON_PIN   ?= triton==3.8.0
PYTEST_ARGS  ?=
BENCH_ARGS   ?=
# Sources whose change must rebuild the editable install (the C++/CUDA extension).
BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*)

.PHONY: test bench bench-smoke demo venv cuda-compile-check sm90-check screen-counts gpu-validate device-versions-check clean

venv: $(VENV)/.installed

$(VENV)/bin/python:
	$(PYTHON) scripts/make_venv.py $(VENV)

$(VENV)/.deps: | $(VENV)/bin/python
	@$(PY) -c "import torch" 2>/dev/null \
	  && echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') already present: kept" \
	  || $(PY) -m pip install -q "$(TORCH_CPU)"
	@$(PY) -c "import triton" 2>/dev/null \
	  && echo "triton $$($(PY) -c 'import triton; print(triton.__version__)') already present: kept" \
	  || $(PY) -m pip install -q --no-deps "$(TRITON_PIN)"
	@$(PY) scripts/install_missing.py pytest hypothesis pytest-benchmark numpy tqdm setuptools wheel ninja \
	  huggingface_hub tokenizers safetensors tiktoken
	@touch $@

$(VENV)/.installed: $(VENV)/.deps $(BUILD_INPUTS)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@$(PY) -c "import hdlm_kernels as hk; print(hk.info())"
	@touch $@

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: venv
	@$(PY) scripts/install_missing.py matplotlib
	$(PY) -m benchmarks $(BENCH_ARGS)

# Every benchmark once, untimed (CI runs this so that the suites cannot rot between GPU runs).
bench-smoke: venv
	$(PY) -m pytest -q -p no:cacheprovider benchmarks --benchmark-disable

# Train a tiny model on the bundled corpus for a few minutes, then sample with τ_Block + KV cache + ACS.
DEMO_ARGS ?=
demo: venv
	@$(PY) scripts/install_missing.py matplotlib
	$(PY) -m hdlm_reference.demo $(DEMO_ARGS)

# Compile the CUDA sources against a CUDA build of torch (no GPU needed); see the script.
cuda-compile-check:
	bash .ci/cuda_compile_check.sh

# Compile every dispatchable Triton launch and the CUDA sources for sm_90 without a GPU; write the
# resource table benchmarks/results/sm90-resources.{json,md}; fail on what cannot run well there.
SM90_ARGS ?=
sm90-check: venv
	$(PY) scripts/sm90_check.py $(SM90_ARGS)

# Static instruction and FP64 counts per loop of the sampling kernels for sm_90 (no GPU needed):
# benchmarks/results/screen-sass-counts.{json,md}; fails when a screen loop holds an FP64 instruction.
screen-counts: venv
	$(PY) scripts/screen_sass_counts.py $(SCREEN_COUNTS_ARGS)

# The one command a GPU machine runs (see README, "GPU validation"); DRY_RUN=1 runs CPU stand-ins.
# No venv prerequisite: building it (with 16 jobs there) is the script's first, timed phase.
GPU_VALIDATE_ARGS ?=
gpu-validate:
	$(PYTHON) scripts/gpu_validate.py $(GPU_VALIDATE_ARGS)

# The sm_90 gate under the GPU machine's versions (triton 3.6.0, torch 2.11), in a cached venv.
device-versions-check:
	bash .ci/device_versions_check.sh

clean:
	rm -rf $(VENV) build *.egg-info hdlm_kernels/_C*.so hdlm_kernels/_build_info.json benchmarks/out runs/demo
