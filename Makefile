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
# without it the real-model test skips.
test: $(STAMP)
	$(BIN)/python benchmarks/example_data.py || echo "example model unavailable: the real-model test will skip"
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
