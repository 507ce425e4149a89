# Sourced by benchmarks/gpu_recipe.sh and gpu_parallel.sh, from the checkout's root: installs the
# carried wheels (once), unpacks the carried data (once) and sets PYTHONPATH, PY and GPU_ARGS
# (--data, --weights for gpu_recipe.py).
BUNDLE=${GPU_BUNDLE:-gpu}
PY=${PYTHON:-python3}
if [ -z "${NEUROCBIR_GPU_READY:-}" ] && compgen -G "$BUNDLE/wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/neurocbir-site "$BUNDLE"/wheels/*.whl
fi
[ -d /tmp/neurocbir-site ] && export PYTHONPATH=/tmp/neurocbir-site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NEUROCBIR_GPU_READY=1
[ ! -d "$BUNDLE/data" ] && [ -f "$BUNDLE/data.tgz" ] && tar xzf "$BUNDLE/data.tgz" -C "$BUNDLE"
GPU_ARGS=()
[ -d "$BUNDLE/data" ] && GPU_ARGS+=(--data "$BUNDLE/data")
[ -f "$BUNDLE/tf_efficientnet_lite2.fp16.safetensors" ] && GPU_ARGS+=(--weights "$BUNDLE/tf_efficientnet_lite2.fp16.safetensors")
