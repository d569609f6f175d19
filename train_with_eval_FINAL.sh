#!/usr/bin/env bash
# The one-A100 (40 GB) recipe, then one evaluation of the best adapter on the test file (a video never used for
# training or checkpoint selection). The recipe itself is configs/a100_qwen2_5_omni.yaml, or configs/a100_qwen3_omni.yaml
# when MODEL's config.json is a Qwen3-Omni MoE checkpoint (CONFIG=... picks another):
# this script passes only what its environment variables change, and extra arguments go to train_vqa.py unchanged:
#   MODEL=/models/Qwen2.5-Omni-7B DATA=/data/real-colon-vqa bash train_with_eval_FINAL.sh --load_in_4bit True
#
# Variables: MODEL DATA TRAIN_DATA VAL_DATA TEST_DATA FRAMES_DIR EVAL_FRAMES_DIR TEST_FRAMES_DIR AUDIO_DIR
# EVAL_AUDIO_DIR TEST_AUDIO_DIR OUTPUT_DIR QUESTION_MODALITY FRAME_SIZE FRAMES TOKEN_KEPT_RATIO EPOCHS MAX_STEPS LR
# BATCH GRAD_ACC LORA_R (alpha = 2 r) EVAL_GENERATE_SAMPLES EVAL_STRATEGY EVAL_STEPS PRECISION (replaces
# "--bf16 True") EVAL_BATCH WORKERS PYTHON CONFIG.
#
# Rerun after a crash with the same settings: training resumes from the last complete checkpoint in OUTPUT_DIR
# (--resume_from_checkpoint auto). An OUTPUT_DIR holding another run's files is refused, never overwritten.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python}
if [[ -z "${CONFIG:-}" ]]; then  # the model family from MODEL's config.json (model_type), else Qwen2.5-Omni
  CONFIG=configs/a100_qwen2_5_omni.yaml
  if [[ -n "${MODEL:-}" && -f "$MODEL/config.json" ]]; then
    family=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("model_type", ""))' \
      "$MODEL/config.json")
    [[ "$family" == qwen3_omni_moe* ]] && CONFIG=configs/a100_qwen3_omni.yaml
  fi
fi
if [[ -n "${DATA:-}" ]]; then
  TRAIN_DATA=${TRAIN_DATA:-$DATA/in_template_train.jsonl}
  VAL_DATA=${VAL_DATA:-$DATA/out_template_val.jsonl}
  FRAMES_DIR=${FRAMES_DIR:-$DATA/frames}
  AUDIO_DIR=${AUDIO_DIR:-$DATA/audio/in_template}
  EVAL_AUDIO_DIR=${EVAL_AUDIO_DIR:-$DATA/audio/out_template}
fi

# The recipe's own values for what the evaluation step needs (one source of truth: the YAML file).
eval "$("$PYTHON" - "$CONFIG" <<'PY'
import shlex, sys, yaml
recipe = yaml.safe_load(open(sys.argv[1])) or {}
for key in ("output_dir", "frames_dir", "eval_audio_dir", "question_modality"):
    value = recipe.get(key)
    print(f"RECIPE_{key.upper()}={shlex.quote('' if value is None else str(value))}")
PY
)"

args=()
flag() {  # flag NAME VALUE...: pass --NAME VALUE for every value given
  local name=$1; shift
  for value in "$@"; do args+=("--$name" "$value"); done
}
[[ -n "${MODEL:-}" ]] && flag model_name_or_path "$MODEL"
[[ -n "${TRAIN_DATA:-}" ]] && flag train_data_path "$TRAIN_DATA"
[[ -n "${VAL_DATA:-}" ]] && flag eval_data_path "$VAL_DATA"
[[ -n "${FRAMES_DIR:-}" ]] && flag frames_dir "$FRAMES_DIR"
[[ -n "${EVAL_FRAMES_DIR:-}" ]] && flag eval_frames_dir "$EVAL_FRAMES_DIR"
[[ -n "${QUESTION_MODALITY:-}" ]] && flag question_modality "$QUESTION_MODALITY"
MODALITY=${QUESTION_MODALITY:-$RECIPE_QUESTION_MODALITY}
if [[ "$MODALITY" == "text" ]]; then
  flag audio_dir ""
  flag eval_audio_dir ""
else
  [[ -n "${AUDIO_DIR:-}" ]] && flag audio_dir "$AUDIO_DIR"
  [[ -n "${EVAL_AUDIO_DIR:-}" ]] && flag eval_audio_dir "$EVAL_AUDIO_DIR"
fi
[[ -n "${OUTPUT_DIR:-}" ]] && flag output_dir "$OUTPUT_DIR"
[[ -n "${FRAME_SIZE:-}" ]] && flag frame_size "$FRAME_SIZE"
[[ -n "${FRAMES:-}" ]] && { flag max_train_frames "$FRAMES"; flag max_eval_frames "$FRAMES"; }
[[ -n "${TOKEN_KEPT_RATIO:-}" ]] && flag token_kept_ratio "$TOKEN_KEPT_RATIO"
[[ -n "${EPOCHS:-}" ]] && flag num_train_epochs "$EPOCHS"
[[ -n "${MAX_STEPS:-}" ]] && flag max_steps "$MAX_STEPS"
[[ -n "${LR:-}" ]] && flag learning_rate "$LR"
[[ -n "${BATCH:-}" ]] && { flag per_device_train_batch_size "$BATCH"; flag per_device_eval_batch_size "$BATCH"; }
[[ -n "${GRAD_ACC:-}" ]] && flag gradient_accumulation_steps "$GRAD_ACC"
[[ -n "${LORA_R:-}" ]] && { flag lora_r "$LORA_R"; flag lora_alpha $((2 * LORA_R)); }
[[ -n "${EVAL_GENERATE_SAMPLES:-}" ]] && flag eval_generate_samples "$EVAL_GENERATE_SAMPLES"
[[ -n "${EVAL_STRATEGY:-}" ]] && { flag eval_strategy "$EVAL_STRATEGY"; flag save_strategy "$EVAL_STRATEGY"; }
[[ -n "${EVAL_STEPS:-}" ]] && { flag eval_steps "$EVAL_STEPS"; flag save_steps "$EVAL_STEPS"; }
[[ -n "${WORKERS:-}" ]] && flag dataloader_num_workers "$WORKERS"
precision=()
if [[ -n "${PRECISION:-}" ]]; then
  read -r -a precision <<< "$PRECISION"
  precision=(--bf16 False "${precision[@]}")
fi

"$PYTHON" train_vqa.py "$CONFIG" "${args[@]}" "${precision[@]}" --resume_from_checkpoint auto "$@"

OUT=${OUTPUT_DIR:-$RECIPE_OUTPUT_DIR}
eval_audio=()
if [[ "$MODALITY" != "text" ]]; then
  eval_audio=(--audio_dir "${TEST_AUDIO_DIR:-${EVAL_AUDIO_DIR:-$RECIPE_EVAL_AUDIO_DIR}}")
fi
eval_base=()  # a LoftQ adapter applies to the nf4 base it started from
if "$PYTHON" -c 'import sys; from surgvqa.lora import applies_to_nf4_base; from surgvqa.run_config import RunConfig
run = RunConfig.find(sys.argv[1]); sys.exit(0 if run and applies_to_nf4_base(run.lora) else 1)' "$OUT"; then
  eval_base=(--load_in_4bit True)
fi
"$PYTHON" evaluate_checkpoint.py \
  --checkpoint_path "$OUT" \
  "${eval_base[@]}" \
  --eval_data_path "${TEST_DATA:-${DATA:-data}/out_template_test.jsonl}" \
  --frames_dir "${TEST_FRAMES_DIR:-${FRAMES_DIR:-$RECIPE_FRAMES_DIR}}" \
  "${eval_audio[@]}" \
  --batch_size "${EVAL_BATCH:-8}" \
  --output_file "$OUT/test_predictions.jsonl" \
  --overwrite True  # the adapter in OUTPUT_DIR was just (re)trained: earlier predictions of it are stale
