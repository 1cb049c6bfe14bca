# Two commands do all the set-up on a fresh machine (see README.md):
#   make example   # virtual environment, example model, quantize it, print the table
#   make test      # virtual environment, the test suite (what .ci/run runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.qtool-installed

.PHONY: example test clean-venv

# torch first, from a local wheel if pip finds one (its dependencies then come from the usual index),
# else from the PyTorch CPU index: never the multi-GB CUDA build. A torch that is already importable
# (say, a CUDA one in a --system-site-packages venv) is kept.
$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null \
		|| { $(BIN)/python -m pip install -q --no-index --no-deps $(TORCH) && $(BIN)/python -m pip install -q $(TORCH); } \
		|| $(BIN)/python -m pip install -q $(TORCH) --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/python -m pip install -q -e ".[example,test,data]"
	touch $@

example: $(STAMP)
	$(BIN)/python benchmarks/quality.py

# The example model is fetched here, as set-up, so that no test touches the network;
# without it the real-model test skips. The tests run in TEST_WORKERS processes (pytest-xdist), a test
# file to each in turn (its module fixtures, such as the kernel build, made once); TEST_WORKERS=0 runs
# them in this process. At most 4 by default: each may hold a few GB.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 4 ? n : 4 )))
test: $(STAMP)
	$(BIN)/python benchmarks/example_data.py || echo "example model unavailable: the real-model test will skip"
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean-venv:
	rm -rf $(VENV)
