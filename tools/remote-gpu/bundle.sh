#!/usr/bin/env bash
# Fills gpu/ (git-ignored) with what tools/remote-gpu/recipe.sh needs on a machine without network:
# the 256 px copy of the data (32 MB, also as data.tgz), the wheels it lacks, EfficientNet-Lite2
# weights in float16. Carry gpu/data.tgz, gpu/wheels and gpu/tf_efficientnet_lite2.fp16.safetensors:
# with the tracked files they must fit the device's 64 MiB transfer (checked at the end).
# FAISS is not among the wheels (19 MB): without it the index searches exactly in NumPy.
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=${1:-../shared/data/brain-tumor-figshare-256}
EXTERNAL=${EXTERNAL:-../shared/data/brain-tumor-external-v2}
rm -rf gpu/wheels && mkdir -p gpu/wheels
rm -rf gpu/data && cp -r --no-preserve=mode "$SRC" gpu/data
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  -d gpu/wheels pytorch-metric-learning==2.9.0 monai==1.6.1
python - <<'PY'
import timm
import torch
from safetensors.torch import save_file

from neurocbir.models.encoders import _lite2_weights_file, _map_state_dict_by_order

m = timm.create_model("tf_efficientnet_lite2", pretrained=False)  # the package's weights, in timm's names
sd = _map_state_dict_by_order(torch.load(_lite2_weights_file(), map_location="cpu", weights_only=True), m.state_dict())
# float16, without the ImageNet classifier (never used): 9.8 MB, so the bundle fits a 64 MB transfer
keep = {k: v.half().contiguous() for k, v in sd.items() if not k.startswith("classifier.")}
save_file(keep, "gpu/tf_efficientnet_lite2.fp16.safetensors")
PY
# other hospitals' slices: their development part, in a folder of its own name (bundle_external.py)
NAME=$(basename "$EXTERNAL")
rm -rf gpu/external "gpu/$NAME"
if [ -f "$EXTERNAL/metadata.csv" ]; then python tools/remote-gpu/bundle_external.py "$EXTERNAL" gpu; fi
tar czf gpu/data.tgz -C gpu data $( [ -d "gpu/$NAME" ] && echo "$NAME" )
carried=$( (git ls-files -z | xargs -0 cat; cat gpu/data.tgz gpu/wheels/*.whl gpu/tf_efficientnet_lite2.fp16.safetensors) | wc -c)
echo "what travels (tracked files + gpu/data.tgz, wheels, weights): $((carried / 1048576)) MiB of 64"
[ "$carried" -le $((64 * 1048576)) ] || { echo "over the 64 MiB transfer limit: carry less" >&2; exit 1; }
