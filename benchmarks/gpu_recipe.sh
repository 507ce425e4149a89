#!/usr/bin/env bash
# The lesion recipe on one borrowed GPU machine (PyTorch, timm, scikit-learn, h5py installed;
# no network; nothing of this project's pins). Prepare the carried folder here first:
#   bash benchmarks/gpu_bundle.sh          # -> gpu/: data at 256 px, wheels, fp16 weights
# then on the machine, from the checkout's root:
#   OUT=/some/folder bash benchmarks/gpu_recipe.sh [gpu_recipe.py options]
# Only the inner-CV calibration and outline level of an existing run (3 trainings), into OUT:
#   OUT=/some/folder bash benchmarks/gpu_recipe.sh --recalibrate models/lesion-fold5
# A CPU smoke run (what the tests do): OUT=/tmp/x bash benchmarks/gpu_recipe.sh --per-group 3 --epochs 1 ...
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${GPU_BUNDLE:-gpu}
: "${OUT:?set OUT to the folder that receives metrics and the checkpoint}"
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G "$BUNDLE/wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/neurocbir-site "$BUNDLE"/wheels/*.whl
  export PYTHONPATH=/tmp/neurocbir-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
args=()
[ ! -d "$BUNDLE/data" ] && [ -f "$BUNDLE/data.tgz" ] && tar xzf "$BUNDLE/data.tgz" -C "$BUNDLE"
[ -d "$BUNDLE/data" ] && args+=(--data "$BUNDLE/data")
[ -f "$BUNDLE/tf_efficientnet_lite2.fp16.safetensors" ] && args+=(--weights "$BUNDLE/tf_efficientnet_lite2.fp16.safetensors")
"$PY" benchmarks/gpu_recipe.py --out "$OUT" "${args[@]}" "$@" 2>&1 | tee "$OUT/log.txt"
