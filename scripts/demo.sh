#!/usr/bin/env bash
# `make demo`: the main job end to end on CPU with a tiny random Qwen2.5-Omni thinker.
#   1. build the tiny model and a synthetic training/validation split (videos 002-002…002-006; never the test clips)
#   2. fine-tune LoRA with train_with_eval_FINAL.sh (the A100 recipe, tiny CPU settings)
#   3. evaluate on test_set/out_002-001.jsonl (unseen video, reworded questions) against the majority baseline
#   4. evaluate again with the video blanked (--ablate video): the accuracy must fall back to the baseline
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RUNS=${RUNS:-runs}
TINY=$RUNS/tiny-omni
DATA=$RUNS/demo-data
OUT=$RUNS/demo
MODALITY=${DEMO_QUESTION_MODALITY:-text}

if [[ ! -f $TINY/model.safetensors ]]; then
  "$PYTHON" scripts/make_tiny_model.py --output_dir "$TINY"
fi
audio_flag=(--no_audio)
[[ "$MODALITY" != "text" ]] && audio_flag=()
if [[ ! -f $DATA/train/in_template.jsonl ]]; then
  "$PYTHON" scripts/make_synthetic_dataset.py --output_dir "$DATA/train" --num_clips "${DEMO_CLIPS:-160}" --seed 7 \
    --video_ids 002-002,002-003,002-004,002-005 "${audio_flag[@]}"
  "$PYTHON" scripts/make_synthetic_dataset.py --output_dir "$DATA/val" --num_clips 16 --seed 8 \
    --video_ids 002-006 "${audio_flag[@]}"
fi

# The tiny model has no language prior: it cannot know that "is the endoscope being retracted?" asks what
# "is the scope pulling back?" asks. So it trains on both wordings of the TRAINING videos (ids of the reworded
# copy get an "-out" suffix to keep (video_id, id) unique); the test clips stay unseen. A 7B model does not need this.
if [[ "$MODALITY" == "text" && ! -f $DATA/train/both_templates.jsonl ]]; then
  "$PYTHON" - "$DATA/train" <<'PY'
import json, sys
root = sys.argv[1]
with open(f"{root}/both_templates.jsonl", "w") as out:
    for name, suffix in (("in_template.jsonl", ""), ("out_template.jsonl", "-out")):
        for line in open(f"{root}/{name}"):
            record = json.loads(line)
            record["id"] += suffix
            out.write(json.dumps(record) + "\n")
PY
fi
TRAIN_FILE=$DATA/train/in_template.jsonl
[[ "$MODALITY" == "text" ]] && TRAIN_FILE=$DATA/train/both_templates.jsonl

rm -rf "$OUT"
MODEL=$TINY \
TRAIN_DATA=$TRAIN_FILE \
VAL_DATA=$DATA/val/out_template.jsonl \
TEST_DATA=test_set/out_002-001.jsonl \
FRAMES_DIR=$DATA/train/frames \
EVAL_FRAMES_DIR=$DATA/val/frames \
TEST_FRAMES_DIR=test_set/frames \
AUDIO_DIR=$DATA/train/audio/in_template \
EVAL_AUDIO_DIR=$DATA/val/audio/out_template \
TEST_AUDIO_DIR=test_set/audio/out_002-001 \
OUTPUT_DIR=$OUT \
QUESTION_MODALITY=$MODALITY \
FRAME_SIZE=56 FRAMES=8 BATCH=4 GRAD_ACC=1 LR=${DEMO_LR:-5e-3} EPOCHS=${DEMO_EPOCHS:-2} LORA_R=16 \
EVAL_GENERATE_SAMPLES=48 EVAL_BATCH=16 WORKERS=0 PRECISION="--use_cpu True --disable_tqdm True" \
PYTHON=$PYTHON bash train_with_eval_FINAL.sh --train_projectors True --eval_max_new_tokens 24 \
  --eval_batch_size_generate 16 --seed 0

ablate_audio=()
[[ "$MODALITY" != "text" ]] && ablate_audio=(--audio_dir test_set/audio/out_002-001)
"$PYTHON" evaluate_checkpoint.py --checkpoint_path "$OUT" --eval_data_path test_set/out_002-001.jsonl \
  --frames_dir test_set/frames "${ablate_audio[@]}" --batch_size 16 --ablate video \
  --output_file "$OUT/test_predictions_ablate_video.jsonl" --compare "$OUT/test_predictions.summary.json" \
  | tail -n 8

"$PYTHON" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
normal = json.load(open(f"{out}/test_predictions.summary.json"))
blind = json.load(open(f"{out}/test_predictions_ablate_video.summary.json"))
base = normal["baseline"]
print()
print(f"out-of-template test (unseen video 002-001, n={normal['n']}):")
print(f"  accuracy            {100 * normal['accuracy']:5.1f} %   majority baseline {100 * base:5.1f} %"
      f"   ({100 * (normal['accuracy'] - base):+.1f} pts)")
print(f"  video blanked       {100 * blind['accuracy']:5.1f} %   ({100 * (blind['accuracy'] - base):+.1f} pts vs baseline)")
PY
