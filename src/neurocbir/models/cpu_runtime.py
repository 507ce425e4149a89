"""The lesion network compiled for this CPU by OpenVINO, at float32.

Why: PyTorch runs EfficientNet's depthwise convolutions one kernel at a time; OpenVINO fuses
them, which is what `neurocbir add` and each query spend their time on (benchmarks/bulk_add.py,
benchmarks/cpu_precision.py). The outputs equal PyTorch's to ~1e-6, so the neighbours do not
change (bfloat16 did change them). The network is exported to ONNX (a temporary file) and compiled once per
process and checkpoint, on the first scan; PyTorch stays the fallback (``NEUROCBIR_BACKEND=torch``, or OpenVINO missing)
and serves the gradients of the similarity maps.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from neurocbir.errors import ConfigurationError

log = logging.getLogger(__name__)

#: (embedding, descriptor, tumor logits) of a float32 batch (B, 3, S, S) (and, compiled with a
#: region input, the regions to pool over (B, 1, S, S))
Forward = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]

_compiled: dict[tuple[str, int, bool], Forward | None] = {}
_lock = threading.Lock()


def backend() -> str:
    """``openvino`` (the default) or ``torch``, from ``NEUROCBIR_BACKEND``."""
    name = os.environ.get("NEUROCBIR_BACKEND", "openvino").strip().lower()
    if name not in ("openvino", "torch"):
        raise ConfigurationError(f"NEUROCBIR_BACKEND={name!r}: use 'openvino' or 'torch'")
    return name


def _import_openvino():
    # `import openvino` sends a usage event to Google Analytics through openvino-telemetry
    # unless that package is missing; a clinical tool makes no such calls, so it is made missing.
    sys.modules.setdefault("openvino_telemetry", None)
    import openvino

    return openvino


def compile_net(net: torch.nn.Module, image_size: int, key: str, region: bool = False) -> Forward | None:
    """``net`` (eval mode, three outputs) compiled for this CPU, or None to stay on PyTorch.
    Cached per (``key``, size, ``region``): one export per process and checkpoint. With
    ``region``, the compiled forward takes a second input, the region to pool over (B, 1, S, S)."""
    if backend() == "torch":
        return None
    with _lock:
        if (key, image_size, region) in _compiled:
            return _compiled[(key, image_size, region)]
        try:
            ov = _import_openvino()
        except ImportError:
            log.warning("OpenVINO is not installed: the CNN runs on PyTorch (about 2x slower)")
            return None
        try:
            forward = _compile(ov, net, image_size, region)
        except Exception as exc:  # an exporter or compiler gap: stay correct, only slower
            log.warning("OpenVINO could not compile the network (%s): the CNN runs on PyTorch", exc)
            forward = None
        _compiled[(key, image_size, region)] = forward
        return forward


#: batch sizes compiled with a fixed shape besides the network of any batch size: a query's (one
#: scan, or a scan and its mirror). A shape known when compiling lets OpenVINO plan every layer
#: ahead; the outputs are the same (benchmarks/query_stages.py: "the network of any batch size").
FIXED_BATCHES = (1, 2)


def _compile(ov, net: torch.nn.Module, image_size: int, region: bool = False) -> Forward:
    """Export to ONNX (a temporary file), compile for the CPU at float32, one request per thread
    (and per fixed batch size, :data:`FIXED_BATCHES`, compiled on first use)."""
    inputs = (torch.zeros(2, 3, image_size, image_size),)
    names = ["image"]
    if region:
        inputs += (torch.ones(2, 1, image_size, image_size),)
        names.append("region")
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        path = Path(tmp) / "net.onnx"
        torch.onnx.export(
            net,
            inputs,
            str(path),
            dynamo=False,
            input_names=names,
            output_names=["embedding", "descriptor", "tumor_logits"],
            dynamic_axes={n: {0: "batch"} for n in names},
            opset_version=17,
        )
        core = ov.Core()
        model = core.read_model(str(path))
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}  # never bf16: same neighbours
    compiled = {None: core.compile_model(model, "CPU", config)}
    building = threading.Lock()

    def network(n: int):
        key = n if n in FIXED_BATCHES else None
        if key not in compiled:
            with building:
                if key not in compiled:
                    fixed = model.clone()
                    fixed.reshape({name: [n, *[int(d) for d in x.shape[1:]]] for name, x in zip(names, inputs)})
                    compiled[key] = core.compile_model(fixed, "CPU", config)
        return key, compiled[key]

    local = threading.local()  # an infer request serves one call at a time

    def forward(x: np.ndarray, *more: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        key, net_for = network(len(x))
        requests = local.__dict__.setdefault("requests", {})
        if key not in requests:
            requests[key] = net_for.create_infer_request()
        out = requests[key].infer([np.ascontiguousarray(a, dtype=np.float32) for a in (x, *more)])  # copies the outputs
        return out[0], out[1], out[2]

    forward.networks = compiled  # batch size (None: any) -> its compiled network
    return forward
