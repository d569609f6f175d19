#!/usr/bin/env bash
# The planner against a real run on one GPU, in one command (about 5 minutes on an H200, no download):
#   bash benchmarks/gpu_check.sh
# builds the Qwen2.5-Omni-7B thinker from configs/models/qwen2_5_omni_7b_thinker.json with random bf16 weights,
# runs the A100 recipe's settings (8 frames x 384 px, text+audio, batch 1, LoRA r16) in bf16 and 4-bit, with and
# without gradient checkpointing, plus one generation batch each, and prints measured peak memory and s/step next
# to surgvqa plan's prediction (saved as $OUT/gpu_check.json when OUT is set); then builds the Qwen3-Omni-30B-A3B
# thinker straight into 4-bit (benchmarks/moe_gpu_check.py: NF4 experts, no bf16 checkpoint) and runs one QLoRA
# step; with 2 GPUs, FSDP2 and ZeRO-3 against DDP (benchmarks/sharded_check.py). Then, unless
# GPU_CHECK_CALIBRATE=0, a quick CUDA calibration sweep writes $OUT/memory_coefficients_cuda.json.
#
# Packages the machine lacks travel as wheels in .whl/ (benchmarks/gpu_wheels.sh downloads them); they are
# installed into /tmp/site. CPU rehearsal of the same script: GPU_CHECK_CONFIG=tiny DEVICE=cpu bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRANSFORMERS_VERBOSITY=error PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
DEVICE=${DEVICE:-cuda}
CONFIG=${GPU_CHECK_CONFIG:-$([ "$DEVICE" = cuda ] && echo 7b || echo tiny)}
OUT_ARGS=()
if [ -n "${OUT:-}" ]; then OUT_ARGS=(--out "$OUT"); fi
$PY benchmarks/gpu_check.py --config "$CONFIG" --device "$DEVICE" "${OUT_ARGS[@]}"
# Qwen3-Omni-30B-A3B thinker built straight into 4-bit (NF4 experts, random weights): bytes vs plan, one QLoRA step
$PY benchmarks/moe_gpu_check.py --device "$DEVICE" \
  --config "$([ "$CONFIG" = tiny ] && echo tiny || echo configs/models/qwen3_omni_30b_a3b_thinker.json)"
# Sharded training over 2 GPUs (only where 2 exist; DEVICE=cpu rehearses it on 2 CPU processes): the tiny model with
# DDP, FSDP2 (accelerate launch --config_file configs/fsdp2.yaml) and ZeRO-3 (--deepspeed configs/zero3.json, where
# DeepSpeed is installed), each adapter against DDP's, and how each run reported its sharding
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$DEVICE" = cpu ] || [ "$GPUS" -ge 2 ]; then
  $PY benchmarks/sharded_check.py --device "$DEVICE" --out "${OUT:-/tmp}/sharded_check"
else
  echo "sharded check (FSDP2 / ZeRO-3) skipped: $GPUS GPU(s), it needs 2"
fi
if [ "${GPU_CHECK_CALIBRATE:-1}" = 1 ]; then
  CAL_ARGS=(--device "$DEVICE" --quick --coefficients "${OUT:-/tmp}/memory_coefficients_$DEVICE.json" --write)
  if [ -n "${OUT:-}" ]; then CAL_ARGS+=(--json "$OUT/memory_calibration_$DEVICE.json"); fi
  timeout "${GPU_CHECK_CALIBRATE_TIMEOUT:-240}" $PY benchmarks/memory_calibration.py "${CAL_ARGS[@]}" \
    || echo "calibration sweep did not finish (exit $?): the table above stands"
fi
