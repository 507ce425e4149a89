"""Studies across folds (issue 31): each fold's test patients as one study each (benchmarks/studies.py,
`patient_figures`), for one run per test fold, beside the slice-level figures of the same slices;
and all folds' patients pooled.

    .venv/bin/python benchmarks/studies_across_folds.py --runs runs/cpu-fold1 ... runs/cpu-fold5

The runs: `neurocbir train --fold F --out runs/cpu-foldF` (the CPU preset: it holds training
patients out, which fit the study temperature). Nothing is chosen here; each test fold is read
once, to report.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from results_doc import machine, write_section
from studies import patient_figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", required=True)
    args = ap.parse_args()
    from sklearn.metrics import cohen_kappa_score

    from neurocbir.classify.calibration import expected_calibration_error

    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
    lines, ys, probas, slice_t, slices = [], [], [], [], []
    for run in args.runs:
        f = patient_figures(run)
        cfg = json.loads((run / "config.json").read_text())
        alt = f["ece_slice_temperature"]
        lines.append(
            f"| {f['fold']} | `{run}` ({cfg['encoder']}, {cfg['epochs']} epochs) | {len(f['patients'])} | "
            f"{np.mean(f['slice_correct']):.3f} ({len(f['slice_correct'])}) | {f['accuracy']:.3f} | {f['kappa']:.3f} | "
            f"{f['ece']:.3f} ({', '.join(sorted(f['calibrated']))}) | {'-' if alt is None else f'{alt:.3f}'} | "
            f"{np.mean(f['mixed_key']):.3f} |"
        )
        print(lines[-1], flush=True)
        ys.append(f["y"])
        probas.append(f["proba"])
        slice_t.append(f["proba_slice_temperature"])
        slices += f["slice_correct"]
    y, proba = np.concatenate(ys), np.concatenate(probas)
    pooled_alt = (
        f"{expected_calibration_error(np.concatenate(slice_t), y):.3f}" if all(p is not None for p in slice_t) else "-"
    )
    lines.append(
        f"| all | pooled | {len(y)} | {np.mean(slices):.3f} ({len(slices)}) | {(proba.argmax(1) == y).mean():.3f} | "
        f"{cohen_kappa_score(y, proba.argmax(1)):.3f} | {expected_calibration_error(proba, y):.3f} | {pooled_alt} | |"
    )
    body = [
        "## Studies across folds (issue 31)",
        "",
        f"Command: `python benchmarks/studies_across_folds.py --runs {' '.join(map(str, args.runs))}` | machine: "
        f"{machine()} | {started} | {time.time() - t0:.0f} s",
        "",
        "Each test patient's slices as one study, answered by `answer_study` over that run's demo archive (the other "
        "four folds and the external development part), as in 'Studies: one answer per patient'. ECE: 10 bins, "
        "the study's confidence as the app gives it (calibrated: how), then with the run's slice temperature "
        "instead. Key slice: mixed between 12 no-tumor validation slices, the key slice is one of the patient's.",
        "",
        "| test fold | run | patients | slice accuracy (slices) | patient accuracy | patient kappa | patient ECE | "
        "patient ECE, slice temperature | mixed: key slice the patient's |",
        "|---|---|---|---|---|---|---|---|---|",
        *lines,
    ]
    write_section("studies-across-folds", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
