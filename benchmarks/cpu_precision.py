"""The served model's CNN on this CPU (issue 9): PyTorch float32, PyTorch bfloat16 and
OpenVINO float32 (the default runtime, neurocbir.models.cpu_runtime); speed, and whether each
retrieves the same neighbours as PyTorch float32.

    .venv/bin/python benchmarks/cpu_precision.py [--run models/lesion-fold5]

Embeds every slice each way (batches of 32), times single-image queries, and compares the test
fold's nearest neighbours and NIR kappa with PyTorch float32 archive and queries: each variant for
both, and a variant's archive with PyTorch float32 queries (an archive indexed one way, queried
another).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from results_doc import machine, write_section

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=ROOT / "models" / "lesion-fold5")
    args = p.parse_args()
    from neurocbir.classify.neighbors import NIRClassifier
    from neurocbir.data.cases import load_cases
    from neurocbir.evaluate.metrics import classifier_probas, scores
    from neurocbir.models.inference import load_model

    model = load_model(args.run)
    table = load_cases(model.config.data)
    a_rows, q_rows = np.flatnonzero(table.fold != model.config.fold), np.flatnonzero(table.fold == model.config.fold)
    embs, speed = {}, {}
    variants = {
        "PyTorch float32": ("torch", False),
        "PyTorch bfloat16": ("torch", True),
        "OpenVINO float32": ("openvino", False),
    }
    for name, (backend, bf16) in variants.items():
        os.environ["NEUROCBIR_BACKEND"] = backend
        model.embed([table.load_image(0)])  # OpenVINO compiles on the first call: not timed
        out, t0 = [], time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for b in range(0, len(table), 32):
                out.append(model.embed([table.load_image(i) for i in range(b, min(b + 32, len(table)))])[0])
            embs[name] = np.concatenate(out)
            speed[name] = [len(table) / (time.perf_counter() - t0)]
            image, times = table.load_image(int(q_rows[0])), []
            for i in range(25):
                t1 = time.perf_counter()
                model.analyse(image)
                if i >= 5:
                    times.append(time.perf_counter() - t1)
            speed[name].append(1000 * float(np.median(times)))
    y = table.label
    ref = "PyTorch float32"
    combos = {f"{ref} archive and queries": (ref, ref)}
    for name in variants:
        if name != ref:
            combos[f"{name} archive and queries"] = (name, name)
            combos[f"{name} archive, {ref} queries"] = (name, ref)
    ref_ids, rows, agreement = None, [], []
    for label, (a, q) in combos.items():
        clf = NIRClassifier().fit(embs[a][a_rows], y[a_rows])
        _, ids = clf.kneighbors(embs[q][q_rows], 5)
        kappa, _ = scores(y[q_rows], classifier_probas(clf.neighbour_labels(embs[q][q_rows]), 3)["nir"])
        if ref_ids is None:
            ref_ids = ids
        top1 = float(np.mean(ids[:, 0] == ref_ids[:, 0]))
        top5 = float(np.mean([len(set(i) & set(j)) / 5 for i, j in zip(ids, ref_ids)]))
        rows.append(f"| {label} | {top1:.3f} | {top5:.3f} | {kappa:.3f} |")
        agreement.append(top1)
    verdicts = []
    for name in variants:
        if name == ref:
            continue
        top1 = min(a for label, a in zip(combos, agreement) if label.startswith(name))
        verdicts.append(
            f"{name}: the same nearest neighbours as {ref} ({100 * top1:.1f} % same top-1 at worst)."
            if top1 >= 0.95
            else f"{name} changes the nearest neighbours ({100 * top1:.1f} % same top-1 at worst; the archive "
            "holds many near-equidistant slices of one patient): not used, since its index would not retrieve "
            "what the evaluated model retrieves."
        )
    body = "\n".join(
        [
            "## The CNN on the CPU: runtimes, precision, neighbours (issue 9)",
            "",
            f"Command: `python benchmarks/cpu_precision.py {' '.join(sys.argv[1:])}` | machine: {machine()} | "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | run `{args.run.name}`, {len(table)} slices",
            "",
            "| runtime and precision | embedding throughput, batches of 32 (slices/s, JPEG decoding included) | one query's CNN pass, p50 (ms) |",
            "|---|---|---|",
            *(f"| {n} | {v[0]:.1f} | {v[1]:.1f} |" for n, v in speed.items()),
            "",
            "| archive / queries | same top-1 as PyTorch float32 | top-5 overlap | NIR kappa (test fold) |",
            "|---|---|---|---|",
            *rows,
            "",
            "\n\n".join(verdicts),
        ]
    )
    write_section("precision", body)
    print(body)


if __name__ == "__main__":
    main()
