# Two commands on a fresh machine: `make demo` and `make test`.
# Installs are reproducible: .venv gets exactly the versions in constraints.txt (what the suite last passed with).
# `make test-latest` runs the suite against the newest versions pyproject.toml's ranges allow (in .venv-latest);
# `make lock` runs it, then writes those versions to constraints.txt. Upgrading is a deliberate, tested change.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := constraints.txt
LATEST ?= .venv-latest

.PHONY: venv system-deps demo test test-all test-latest lock lint bench memory-doc clean

system-deps:
	@command -v g++ >/dev/null 2>&1 || { \
	  echo "installing g++ (DeepSpeed compiles its CPU communication op at first use: the ZeRO-3 test)"; \
	  (apt-get update -qq && apt-get install -y -qq g++) >/dev/null || \
	  echo "WARNING: could not install g++; the ZeRO-3 test will fail to build DeepSpeed's op"; }
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  echo "installing espeak-ng (offline TTS for spoken questions)"; \
	  (apt-get update -qq && apt-get install -y -qq espeak-ng) >/dev/null || \
	  echo "WARNING: could not install espeak-ng; data generation will need it"; }
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  echo "installing chromium + chromium-driver (headless browser for the HTML report test)"; \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null || \
	  echo "WARNING: could not install chromium; the browser test of the HTML report will be skipped"; }

$(STAMP): pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) --upgrade pip
	$(BIN)/pip install -q -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv system-deps
	PATH=$(abspath $(BIN)):$$PATH bash scripts/demo.sh

test: venv system-deps
	$(BIN)/python -m pytest -q

test-all: venv system-deps
	$(BIN)/python -m pytest -q -m "slow or not slow"

# a fresh venv with the newest versions the ranges allow (no constraints), then the default suite
test-latest: system-deps
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	$(LATEST)/bin/pip list --format=freeze | grep -i -E '^(torch|transformers|peft|accelerate|bitsandbytes)=='
	$(LATEST)/bin/python -m pytest -q

# the versions test-latest just passed with become the lock
lock: test-latest
	{ echo "# The exact versions the test suite passed with (make lock; make venv installs these)."; \
	  $(LATEST)/bin/pip freeze --all --exclude-editable; } > $(LOCK)

lint: venv
	$(BIN)/ruff check .

bench: venv
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

# docs/MEMORY.md from `surgvqa plan` (token counts need the real Qwen vocabulary: a tiny model built with it)
QWEN_VOCAB ?= runs/tiny-omni-qwen
memory-doc: venv
	test -f $(QWEN_VOCAB)/tokenizer.json || $(BIN)/python scripts/make_tiny_model.py --vocab qwen --output_dir $(QWEN_VOCAB)
	$(BIN)/python scripts/make_memory_doc.py --processor $(QWEN_VOCAB)

clean:
	rm -rf runs .pytest_cache $(LATEST)
