#!/usr/bin/env bash
# `make demo`: the main job end to end on CPU with a tiny random Qwen2.5-Omni thinker.
#   1. build the tiny model and a synthetic set: training videos 002-002…002-005, validation video 002-006
#      (checkpoint selection), test video 002-007 (never trained on, never used to choose anything)
#   2. fine-tune LoRA with train_with_eval_FINAL.sh (the A100 recipe, tiny CPU settings); it ends with the test run
#   3. evaluate the test video again with every frame replaced by one constant frame (--ablate video), paired
#      against the normal run: the accuracy must fall back to the majority baseline
#   4. write the HTML report of both runs
# The question types are those whose answer is in every single frame (see benchmarks/README.md, section 5,
# demo_learning.py): a tiny random model does not learn the motion types in a CPU budget.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RUNS=${RUNS:-runs}
TINY=$RUNS/tiny-omni
DATA=$RUNS/demo-data
OUT=$RUNS/demo
TYPES=${DEMO_TYPES:-nbi_status,tool_catheter_check}
STEPS=${DEMO_STEPS:-400}
LR=${DEMO_LR:-1e-3}

if [[ ! -f $TINY/model.safetensors ]]; then
  "$PYTHON" scripts/make_tiny_model.py --output_dir "$TINY"
fi
make_split() {  # make_split NAME SEED NUM_CLIPS VIDEO_IDS (kept while its settings are unchanged)
  local settings="--seed $2 --num_clips $3 --video_ids $4 --question_types $TYPES --no_audio"
  [[ -f $DATA/$1/in_template.jsonl && "$(cat "$DATA/$1.settings" 2>/dev/null)" == "$settings" ]] && return
  rm -rf "${DATA:?}/$1"
  # shellcheck disable=SC2086  # the settings are words
  "$PYTHON" scripts/make_synthetic_dataset.py --output_dir "$DATA/$1" $settings > "$DATA/$1.log" \
    || { cat "$DATA/$1.log"; exit 1; }
  echo "$settings" > "$DATA/$1.settings"
  echo "$1 split: $(wc -l < "$DATA/$1/in_template.jsonl") questions, video(s) $4 ($DATA/$1)"
}
mkdir -p "$DATA"
make_split train 7 160 002-002,002-003,002-004,002-005
make_split val 8 16 002-006
make_split test 9 60 002-007

rm -rf "$OUT"
echo "training ($STEPS steps, about a CPU-minute) ..."
MODEL=$TINY \
TRAIN_DATA=$DATA/train/in_template.jsonl \
VAL_DATA=$DATA/val/in_template.jsonl \
TEST_DATA=$DATA/test/in_template.jsonl \
FRAMES_DIR=$DATA/train/frames \
EVAL_FRAMES_DIR=$DATA/val/frames \
TEST_FRAMES_DIR=$DATA/test/frames \
OUTPUT_DIR=$OUT \
QUESTION_MODALITY=text \
FRAME_SIZE=56 FRAMES=8 BATCH=4 GRAD_ACC=1 LR=$LR MAX_STEPS=$STEPS LORA_R=16 \
EVAL_STRATEGY=steps EVAL_STEPS=$((STEPS / 4)) EVAL_GENERATE_SAMPLES=48 EVAL_BATCH=16 WORKERS=0 \
PRECISION="--use_cpu True --disable_tqdm True" \
PYTHON=$PYTHON bash train_with_eval_FINAL.sh --train_projectors True --eval_max_new_tokens 24 \
  --eval_batch_size_generate 16 --logging_steps 20 --seed 0 > "$OUT.log" 2>&1 \
  || { tail -n 30 "$OUT.log"; echo "error: training failed; the whole log is $OUT.log" >&2; exit 1; }
# the test run's per-type table (accuracy next to each type's majority baseline)
sed -n '/^type /,/^collapsed types/p' "$OUT.log"

echo
echo "the same test clips, every frame replaced by one constant frame (--ablate video):"
"$PYTHON" evaluate_checkpoint.py --checkpoint_path "$OUT" --eval_data_path "$DATA/test/in_template.jsonl" \
  --frames_dir "$DATA/test/frames" --batch_size 16 --ablate video \
  --output_file "$OUT/test_predictions_ablate_video.jsonl" --compare "$OUT/test_predictions.jsonl" \
  > "$OUT/ablate_video.log" 2>&1 || { cat "$OUT/ablate_video.log"; exit 1; }
grep -E '^(overall|verdict):' "$OUT/ablate_video.log"

"$PYTHON" -m surgvqa report "$OUT/test_predictions.jsonl" --compare "$OUT/test_predictions_ablate_video.jsonl" \
  --train_dir "$OUT" --output "$OUT/report.html" > "$OUT/report.log" 2>&1 || { cat "$OUT/report.log"; exit 1; }

# re-scoring from the predictions file alone (its meta line holds the clustering and the bootstrap seed)
"$PYTHON" evaluate_checkpoint.py --score_predictions "$OUT/test_predictions.jsonl" > "$OUT/rescore.log" 2>&1 \
  || { cat "$OUT/rescore.log"; exit 1; }

"$PYTHON" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
normal = json.load(open(f"{out}/test_predictions.summary.json"))
blind = json.load(open(f"{out}/test_predictions_ablate_video.summary.json"))
rescored = json.load(open(f"{out}/test_predictions.jsonl.rescored.summary.json"))
major = normal["majority_baseline"]
clustered = normal["clustered"]
acc, how = clustered["accuracy"], clustered["clustering"]
lo, hi = normal["accuracy_ci95"]
interval = (f"[{100 * acc['ci95'][0]:.1f}, {100 * acc['ci95'][1]:.1f}] clustered over {acc['n_clusters']} "
            f"{how['unit']}s" if acc["ci95"] else f"no clustered interval ({acc['reason']})")
print()
print(f"accuracy on the unseen test video (n={normal['n']}): {100 * normal['accuracy']:.1f} % {interval} "
      f"(Wilson [{100 * lo:.1f}, {100 * hi:.1f}]) vs majority baseline {100 * major:.1f} % "
      f"({100 * (normal['accuracy'] - major):+.1f} pts)")
if clustered["note"]:
    print(clustered["note"])
same = rescored["clustered"] == clustered and rescored["accuracy_ci95"] == normal["accuracy_ci95"]
print(f"re-scored from {out}/test_predictions.jsonl alone: "
      + ("every interval identical" if same else "INTERVALS DIFFER (a bug: please report it)"))
print(f"accuracy without video (one constant frame): {100 * blind['accuracy']:.1f} % "
      f"({100 * (blind['accuracy'] - major):+.1f} pts vs majority); {blind['comparison']['verdict']}")
print(f"predictions: {out}/test_predictions.jsonl and {out}/test_predictions_ablate_video.jsonl; "
      f"report: {out}/report.html")
PY
