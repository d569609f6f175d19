# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv system-deps demo test test-all lint bench memory-doc clean

system-deps:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  echo "installing espeak-ng (offline TTS for spoken questions)"; \
	  (apt-get update -qq && apt-get install -y -qq espeak-ng) >/dev/null || \
	  echo "WARNING: could not install espeak-ng; data generation will need it"; }
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || { \
	  echo "installing chromium + chromium-driver (headless browser for the HTML report test)"; \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null || \
	  echo "WARNING: could not install chromium; the browser test of the HTML report will be skipped"; }

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv system-deps
	PATH=$(abspath $(BIN)):$$PATH bash scripts/demo.sh

test: venv system-deps
	$(BIN)/python -m pytest -q

test-all: venv system-deps
	$(BIN)/python -m pytest -q -m "slow or not slow"

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
	rm -rf runs .pytest_cache
