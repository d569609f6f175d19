#!/usr/bin/env bash
# The one-A100 (40 GB) recipe: Qwen2.5-Omni-7B thinker, LoRA on the language model, 8 frames at 384 px for training
# and evaluation, batch 1 x accumulation 4, lr 2e-4, 20 epochs, bf16, SDPA. Each epoch: eval loss plus the
# generation-scored accuracy on the validation file; the best checkpoint by that accuracy is kept. Then the best
# adapter is evaluated once on the test file (a video never used for training or checkpoint selection).
#
# Every path and setting is an environment variable; extra arguments go to train_vqa.py unchanged, e.g.
#   MODEL=/models/Qwen2.5-Omni-7B DATA=/data/real-colon-vqa bash train_with_eval_FINAL.sh --load_in_4bit True
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python}
MODEL=${MODEL:-/models/Qwen2.5-Omni-7B}
DATA=${DATA:-data}
TRAIN_DATA=${TRAIN_DATA:-$DATA/in_template_train.jsonl}
VAL_DATA=${VAL_DATA:-$DATA/out_template_val.jsonl}
TEST_DATA=${TEST_DATA:-$DATA/out_template_test.jsonl}
FRAMES_DIR=${FRAMES_DIR:-$DATA/frames}
EVAL_FRAMES_DIR=${EVAL_FRAMES_DIR:-$FRAMES_DIR}
AUDIO_DIR=${AUDIO_DIR:-$DATA/audio/in_template}
EVAL_AUDIO_DIR=${EVAL_AUDIO_DIR:-$DATA/audio/out_template}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/qwen2_5_omni_lora}
QUESTION_MODALITY=${QUESTION_MODALITY:-text+audio}
FRAME_SIZE=${FRAME_SIZE:-384}
FRAMES=${FRAMES:-8}
TOKEN_KEPT_RATIO=${TOKEN_KEPT_RATIO:-1.0}  # video token merging (1.0 = off); evaluation reads it from the checkpoint
EPOCHS=${EPOCHS:-20}
MAX_STEPS=${MAX_STEPS:--1}
LR=${LR:-2e-4}
BATCH=${BATCH:-1}
GRAD_ACC=${GRAD_ACC:-4}
LORA_R=${LORA_R:-16}
EVAL_GENERATE_SAMPLES=${EVAL_GENERATE_SAMPLES:-200}
EVAL_STRATEGY=${EVAL_STRATEGY:-epoch}
EVAL_STEPS=${EVAL_STEPS:-500}
PRECISION=${PRECISION:---bf16 True}
EVAL_BATCH=${EVAL_BATCH:-8}

audio_args=()
if [[ "$QUESTION_MODALITY" != "text" ]]; then
  audio_args=(--audio_dir "$AUDIO_DIR" --eval_audio_dir "$EVAL_AUDIO_DIR")
fi

# shellcheck disable=SC2086
"$PYTHON" train_vqa.py \
  --model_name_or_path "$MODEL" \
  --train_data_path "$TRAIN_DATA" \
  --eval_data_path "$VAL_DATA" \
  --frames_dir "$FRAMES_DIR" \
  --eval_frames_dir "$EVAL_FRAMES_DIR" \
  "${audio_args[@]}" \
  --question_modality "$QUESTION_MODALITY" \
  --frame_size "$FRAME_SIZE" \
  --max_train_frames "$FRAMES" \
  --max_eval_frames "$FRAMES" \
  --token_kept_ratio "$TOKEN_KEPT_RATIO" \
  --output_dir "$OUTPUT_DIR" \
  --per_device_train_batch_size "$BATCH" \
  --per_device_eval_batch_size "$BATCH" \
  --gradient_accumulation_steps "$GRAD_ACC" \
  --learning_rate "$LR" \
  --num_train_epochs "$EPOCHS" \
  --max_steps "$MAX_STEPS" \
  --lora_r "$LORA_R" \
  --lora_alpha $((2 * LORA_R)) \
  --warmup_steps 0.03 \
  --lr_scheduler_type cosine \
  --eval_strategy "$EVAL_STRATEGY" \
  --eval_steps "$EVAL_STEPS" \
  --save_strategy "$EVAL_STRATEGY" \
  --save_steps "$EVAL_STEPS" \
  --save_total_limit 2 \
  --eval_generate_samples "$EVAL_GENERATE_SAMPLES" \
  --load_best_model_at_end True \
  --metric_for_best_model accuracy \
  --greater_is_better True \
  --attn_implementation sdpa \
  --logging_steps 5 \
  --dataloader_num_workers "${WORKERS:-4}" \
  $PRECISION \
  "$@"

eval_audio=()
if [[ "$QUESTION_MODALITY" != "text" ]]; then
  eval_audio=(--audio_dir "${TEST_AUDIO_DIR:-$EVAL_AUDIO_DIR}")
fi
"$PYTHON" evaluate_checkpoint.py \
  --checkpoint_path "$OUTPUT_DIR" \
  --eval_data_path "$TEST_DATA" \
  --frames_dir "${TEST_FRAMES_DIR:-$FRAMES_DIR}" \
  "${eval_audio[@]}" \
  --batch_size "$EVAL_BATCH" \
  --output_file "$OUTPUT_DIR/test_predictions.jsonl" \
  --overwrite True  # the adapter in OUTPUT_DIR was just (re)trained: earlier predictions of it are stale
