"""bfloat16 on this CPU for the served model (issue 9): speed, and whether it retrieves the
same neighbours as float32.

    .venv/bin/python benchmarks/cpu_precision.py [--run models/lesion-fold5]

Embeds every slice in float32 and under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (batches
of 32), times single-image queries both ways, and compares the test fold's nearest neighbours
and NIR kappa with float32 archive and queries, bf16 for both, and a bf16 archive with float32
queries (what indexing in bf16 while querying in float32 would give).
"""

from __future__ import annotations

import argparse
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
    from neurocbir.classify import NIRClassifier
    from neurocbir.data import load_cases
    from neurocbir.evaluate import classifier_probas, scores
    from neurocbir.inference import load_model

    model = load_model(args.run)
    table = load_cases(model.config.data)
    a_rows, q_rows = np.flatnonzero(table.fold != model.config.fold), np.flatnonzero(table.fold == model.config.fold)
    embs, speed = {}, {}
    for name, bf16 in (("float32", False), ("bfloat16", True)):
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
    combos = {
        "float32 archive, float32 queries": ("float32", "float32"),
        "bfloat16 archive, bfloat16 queries": ("bfloat16", "bfloat16"),
        "bfloat16 archive, float32 queries": ("bfloat16", "float32"),
    }
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
    same = min(agreement) >= 0.95
    verdict = (
        "bfloat16 retrieves the same nearest neighbours as float32 (>= 95 % same top-1)."
        if same
        else "bfloat16 changes the nearest neighbours (the archive holds many near-equidistant slices of one "
        "patient), so the app and `neurocbir add` stay in float32: a bf16 index would not retrieve what the "
        "evaluated float32 model retrieves."
    )
    body = "\n".join(
        [
            "## bfloat16 on the CPU: speed and neighbours (issue 9)",
            "",
            f"Command: `python benchmarks/cpu_precision.py {' '.join(sys.argv[1:])}` | machine: {machine()} | "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | run `{args.run.name}`, {len(table)} slices",
            "",
            "| precision | embedding throughput, batches of 32 (slices/s, JPEG decoding included) | one query's CNN pass, p50 (ms) |",
            "|---|---|---|",
            *(f"| {n} | {v[0]:.1f} | {v[1]:.1f} |" for n, v in speed.items()),
            "",
            "| archive / queries | same top-1 as float32 | top-5 overlap with float32 | NIR kappa (test fold) |",
            "|---|---|---|---|",
            *rows,
            "",
            verdict,
        ]
    )
    write_section("precision", body)
    print(body)


if __name__ == "__main__":
    main()
