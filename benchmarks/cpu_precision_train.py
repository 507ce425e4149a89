"""Training-step time of the CPU lesion preset in bfloat16 and float32, on this CPU and with the
CPU restricted to AVX2 (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``, where oneDNN
reports no native bfloat16, as on an AVX2-only AMD EPYC): what `neurocbir train` picks, and what
an epoch costs there (issue 29).

    .venv/bin/python benchmarks/cpu_precision_train.py

Each setting runs in its own process (the ISA is fixed when torch loads); the median of 5 steps
after 2 warm-up steps, on real slices, with the preset's batch, resolution and frozen stages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from results_doc import machine, write_section

STEP = r"""
import json, statistics, sys, time
import numpy as np, torch
from neurocbir.data.cases import load_cases
from neurocbir.models.runs import LESION_CPU_DEFAULTS, TrainConfig
from neurocbir.training.lesion import augment_batch, cpu_bf16_supported, load_tensors
from neurocbir.models.lesion import LesionNet
from pytorch_metric_learning import losses
from monai.losses import DiceCELoss
precision = sys.argv[1]
cfg = TrainConfig(**{**LESION_CPU_DEFAULTS, "recipe": "lesion"})
table = load_cases()
rows = np.flatnonzero(table.fold != 5)[:: max(1, (table.fold != 5).sum() // 96)][:96]
images, masks = load_tensors(table.subset(rows), cfg.image_size)
enc = cfg.build_encoder()
net = LesionNet(enc, cfg.embedding_dim, cfg.head_hidden, cfg.dropout, cfg.decoder_stride).to(memory_format=torch.channels_last)
net.trunk[: net.frozen_stages(cfg.frozen_stride)].requires_grad_(False)
opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
metric, seg = losses.SupConLoss(temperature=0.1), DiceCELoss(sigmoid=True)
y = torch.as_tensor(table.label[rows])
gen = torch.Generator().manual_seed(0)
times = []
for step in range(7):
    idx = torch.randperm(len(rows), generator=gen)[: cfg.batch_size]
    x, m = augment_batch(images[idx], masks[idx], gen)
    t0 = time.perf_counter()
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        emb, _, logits = net(x)
        up = torch.nn.functional.interpolate(logits.float(), size=m.shape[-2:], mode="bilinear")
    loss = metric(emb, y[idx]) + seg(up, m)
    loss.backward(); opt.step()
    times.append(time.perf_counter() - t0)
print(json.dumps({"step_s": statistics.median(times[2:]), "native_bf16": cpu_bf16_supported(),
                  "capability": torch.backends.cpu.get_cpu_capability()}))
"""


def main() -> None:
    from neurocbir.models.runs import LESION_CPU_DEFAULTS

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    steps_per_epoch = 2057 // LESION_CPU_DEFAULTS["batch_size"]  # 6/7 of folds 1-4: the preset's fit rows
    rows = []
    for isa, env in (
        ("native", {}),
        ("restricted to AVX2", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}),
    ):
        for precision in ("bfloat16", "float32"):
            out = subprocess.run(
                [sys.executable, "-c", STEP, precision],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            epochs = LESION_CPU_DEFAULTS["epochs"]
            rows.append(
                f"| {isa} ({r['capability']}; native bf16: {'yes' if r['native_bf16'] else 'no'}) | {precision} | "
                f"{r['step_s']:.2f} | {r['step_s'] * steps_per_epoch / 60:.1f} | {r['step_s'] * steps_per_epoch * epochs / 60:.0f} |"
            )
            print(rows[-1], flush=True)
    body = [
        "## CPU training precision: bfloat16 only where the CPU has it (issue 29)",
        "",
        f"Command: `python benchmarks/cpu_precision_train.py` | machine: {machine()} | {started}",
        "",
        "One training step of the CPU lesion preset (MobileNetV2, 224 px, batch "
        f"{LESION_CPU_DEFAULTS['batch_size']}, stages to stride 8 frozen, stride-2 decoder), median of 5 after 2 "
        "warm-up steps; an epoch is the preset's "
        f"{steps_per_epoch} steps, the training its {LESION_CPU_DEFAULTS['epochs']} epochs (data loading, index and "
        "calibration not included). `neurocbir train` uses bfloat16 only where oneDNN reports native support "
        "(`torch.ops.mkldnn._is_mkldnn_bf16_supported()`), float32 otherwise.",
        "",
        "| CPU | precision | s per step | min per epoch | min of training (25 epochs) |",
        "|---|---|---|---|---|",
        *rows,
    ]
    write_section("cpu-precision-train", "\n".join(body))


if __name__ == "__main__":
    main()
