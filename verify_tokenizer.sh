#!/usr/bin/env bash
# Pre-flight check of a model's or checkpoint's tokenizer: prints pad / eos / end-of-turn tokens with their ids.
# Exit 0 when pad is set, pad != eos and eos is the chat template's end-of-turn token; otherwise exit 1 and print
# the repair that training would apply. Exit 2 (one "error: …" line) when called wrongly or no tokenizer loads.
#   bash verify_tokenizer.sh [MODEL_OR_CHECKPOINT_DIR]      (default: $MODEL)
set -euo pipefail
MODEL_PATH="${1:-${MODEL:-}}"
if [[ -z "$MODEL_PATH" ]]; then
  echo "error: no model directory given (usage: bash verify_tokenizer.sh MODEL_OR_CHECKPOINT_DIR, or set MODEL)" >&2
  exit 2
fi
exec "${PYTHON:-python}" -m surgvqa.tokenizer verify "$MODEL_PATH"
