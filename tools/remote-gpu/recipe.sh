#!/usr/bin/env bash
# The lesion recipe on one borrowed GPU machine (PyTorch, timm, scikit-learn, h5py installed;
# no network; nothing of this project's pins). Prepare the carried folder here first:
#   bash tools/remote-gpu/bundle.sh          # -> gpu/: data at 256 px, wheels, fp16 weights
# then on the machine, from the checkout's root:
#   OUT=/some/folder bash tools/remote-gpu/recipe.sh [recipe.py options]
# Only the inner-CV calibration and outline level of an existing run (3 trainings), into OUT:
#   OUT=/some/folder bash tools/remote-gpu/recipe.sh --recalibrate models/lesion-fold5
# A CPU smoke run (what the tests do): OUT=/tmp/x bash tools/remote-gpu/recipe.sh --per-group 3 --epochs 1 ...
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to the folder that receives metrics and the checkpoint}"
mkdir -p "$OUT"
# shellcheck source=tools/remote-gpu/setup.sh
source tools/remote-gpu/setup.sh
"$PY" tools/remote-gpu/recipe.py --out "$OUT" "${GPU_ARGS[@]}" "$@" 2>&1 | tee "$OUT/log.txt"
