#!/usr/bin/env bash
# Fills gpu/ (git-ignored) with what benchmarks/gpu_recipe.sh needs on a machine without network:
# the 256 px copy of the data (32 MB), the wheels it lacks, EfficientNet-Lite2 weights in float16.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-../shared/data/brain-tumor-figshare-256}
mkdir -p gpu/wheels
rm -rf gpu/data && cp -r --no-preserve=mode "$SRC" gpu/data
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  -d gpu/wheels faiss-cpu==1.15.1 pytorch-metric-learning==2.9.0 monai==1.6.1
python - <<'PY'
import timm
import torch
from safetensors.torch import save_file

from neurocbir.encoders import _lite2_weights_file, _map_state_dict_by_order

m = timm.create_model("tf_efficientnet_lite2", pretrained=False)  # the package's weights, in timm's names
sd = _map_state_dict_by_order(torch.load(_lite2_weights_file(), map_location="cpu", weights_only=True), m.state_dict())
# float16, without the ImageNet classifier (never used): 9.8 MB, so the bundle fits a 64 MB transfer
keep = {k: v.half().contiguous() for k, v in sd.items() if not k.startswith("classifier.")}
save_file(keep, "gpu/tf_efficientnet_lite2.fp16.safetensors")
PY
du -sh gpu
