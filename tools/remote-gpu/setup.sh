# Sourced by tools/remote-gpu/recipe.sh and parallel.sh, from the checkout's root: installs the
# carried wheels, unpacks the carried data and sets PYTHONPATH, PY and GPU_ARGS (recipe.py's
# --data and --weights where the bundle has them).
BUNDLE=${GPU_BUNDLE:-gpu}
PY=${PYTHON:-python3}
if compgen -G "$BUNDLE/wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/neurocbir-site "$BUNDLE"/wheels/*.whl
  export PYTHONPATH=/tmp/neurocbir-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ ! -d "$BUNDLE/data" ] && [ -f "$BUNDLE/data.tgz" ]; then tar xzf "$BUNDLE/data.tgz" -C "$BUNDLE"; fi
GPU_ARGS=()
if [ -d "$BUNDLE/data" ]; then GPU_ARGS+=(--data "$BUNDLE/data"); fi
if [ -f "$BUNDLE/tf_efficientnet_lite2.fp16.safetensors" ]; then
  GPU_ARGS+=(--weights "$BUNDLE/tf_efficientnet_lite2.fp16.safetensors")
fi
