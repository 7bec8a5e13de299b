# Two commands do all the set-up:  `make demo`  and  `make test`.
# Both create .venv on first use; later runs reuse it (nothing is reinstalled unless
# pyproject.toml or requirements/pins.txt changed).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch and torchvision are pinned here, not in pyproject.toml (users bring their own CUDA build).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.vlalign-installed
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-fast lint docs install bench help clean-venv

help:
	@echo "make demo   - set up .venv on first use, then run the whole alignment demo on the shapes world"
	@echo "make test   - set up .venv on first use, then lint, import contracts, docs build and the test suite"
	@echo "make install - set up .venv only (torch, torchvision and vlalign with its dev tools)"
	@echo "make docs   - build the docs site into build/site (mkdocs, strict)"
	@echo "make bench  - the shared-prefix log-prob benchmark (benchmarks/logprobs.py)"

$(STAMP): pyproject.toml requirements/pins.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -c requirements/pins.txt -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vlalign demo

install: $(STAMP)

# The checks a change must pass before the tests: lint and format (ruff), the import
# contracts of the layers (import-linter, [tool.importlinter] in pyproject.toml), the docs site.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site

test: lint docs
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/logprobs.py

clean-venv:
	rm -rf $(VENV)

# The vLLM rollout engine's tests, in a second environment with the CPU build of vLLM (created on
# first use by tests/vllm_rollout/make_env.sh; about 4 minutes), then `pytest -m vllm` there.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.vlalign-vllm-installed
.PHONY: test-vllm

$(VLLM_STAMP): tests/vllm_rollout/make_env.sh tests/vllm_rollout/torchvision_cpu_ops.py
	VLLM_VENV=$(VLLM_VENV) PYTHON=$(PYTHON) bash tests/vllm_rollout/make_env.sh

test-vllm: $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 $(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/vllm_rollout
