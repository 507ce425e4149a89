"""Trust figures for docs/results.md (issue 10): calibration and prediction sets on the test
fold, what the API shows for held-out slices, and who gets "no similar case".

    .venv/bin/python benchmarks/trust.py --run runs/bench/supcon-fold5

Everything was fitted on training patients (`neurocbir train` runs the inner CV); the test
fold is read here once, to report.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from results_doc import machine, write_section

ROOT = Path(__file__).resolve().parents[1]


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def not_mri_pictures() -> dict[str, list[bytes]]:
    """Photos, documents and noise: every one should be flagged."""
    from skimage import data

    rng = np.random.default_rng(0)
    return {
        "photos (skimage: astronaut, coffee, chelsea, camera, rocket)": [
            _png(f()) for f in (data.astronaut, data.coffee, data.chelsea, data.camera, data.rocket)
        ],
        "documents (skimage: text, page)": [_png(data.text()), _png(data.page())],
        "noise and patterns (uniform, Gaussian, checkerboard, blank)": [
            _png(rng.integers(0, 256, (512, 512), dtype=np.uint8)),
            _png(np.clip(rng.normal(128, 40, (512, 512)), 0, 255).astype(np.uint8)),
            _png(data.checkerboard()),
            _png(np.full((512, 512), 90, np.uint8)),
        ],
    }


def packaged_mris() -> dict[str, list[tuple[str, bytes]]]:
    """MRIs that ship inside Python packages (no download): pydicom's MR test files."""
    import pydicom

    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    return {
        "pydicom test MR files (64x64 MR_small*, MR2_*)": [
            (p.name, p.read_bytes()) for p in sorted(folder.glob("MR*.dcm")) if "truncated" not in p.name
        ]
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "bench" / "supcon-fold5")
    p.add_argument("--n-api", type=int, default=200, help="held-out slices sent through POST /query")
    args = p.parse_args()
    from fastapi.testclient import TestClient

    from neurocbir.app.api import create_app
    from neurocbir.classify.calibration import expected_calibration_error
    from neurocbir.data.cases import CLASS_NAMES
    from neurocbir.evaluate.run import evaluate_run
    from neurocbir.evaluate.tables import calibration_markdown
    from neurocbir.serving.service import RetrievalService

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    metrics = evaluate_run(args.run, plots=True)
    cal = metrics["calibration"]
    if cal is None:
        raise SystemExit(f"{args.run} has no calibration.json: train it again with this version")

    svc = RetrievalService.from_run(args.run)
    client = TestClient(create_app(svc))
    table = svc.cases.table
    rows = np.random.default_rng(0).permutation(svc.cases.example_rows)
    shown, y, covered, sizes, flagged_mri, api_flagged, flagged_api = [], [], [], [], [], 0, []
    for r in rows[: args.n_api]:
        jpg = table.loader.image_path(int(table.idx[r])).read_bytes()
        out = client.post("/query", files={"file": ("q.jpg", jpg, "image/jpeg")}).json()
        shown.append([out["probabilities"].get(c, 0.0) for c in CLASS_NAMES])
        y.append(int(table.label[r]))
        covered.append(CLASS_NAMES[int(table.label[r])] in out["prediction_set"])
        sizes.append(len(out["prediction_set"]))
        api_flagged += out["no_similar_case"]  # shown with every class in its set, no confidence
        flagged_api.append(bool(out["no_similar_case"] or out.get("no_close_tumor_case")))
    all_rows = svc.cases.example_rows
    for r in all_rows:  # every held-out slice for the flag rate (in process: same code path)
        flagged_mri.append(svc.query(table.load_image(int(r)), k=1)["no_similar_case"])
    shown, y = np.array(shown), np.array(y)
    api_acc = float((shown.argmax(1) == y).mean())

    flags = [("held-out dataset MRIs (test fold, all slices)", int(np.sum(flagged_mri)), len(flagged_mri), "")]
    for name, pictures in not_mri_pictures().items():
        got = [
            client.post("/query", files={"file": ("x.png", b, "image/png")}).json()["no_similar_case"] for b in pictures
        ]
        flags.append((name, int(sum(got)), len(got), ""))
    for name, files in packaged_mris().items():
        got, notes = [], []
        for fname, data in files:
            r = client.post("/query", files={"file": (fname, data, "application/dicom")})
            if r.status_code != 200:
                notes.append(f"{fname}: {r.status_code}")
                continue
            got.append(r.json()["no_similar_case"])
        flags.append((name, int(sum(got)), len(got), "; ".join(notes)))

    cal_how = json.loads((args.run / "calibration.json").read_text())["how"]
    unsure, singles = shown.max(1) < 0.9, np.array(sizes) == 1
    # the conformal set alone (what the app showed before the set was widened), same answers
    alone = svc.calibrator.conformal_set(shown, 0.95)
    alone[np.array(flagged_api)] = True  # flagged answers hold every type either way
    alone_covered = alone[np.arange(len(y)), y]
    cmd = "python benchmarks/trust.py " + " ".join(sys.argv[1:])
    lines = [
        "## Trust: calibration, prediction sets, no similar case (issue 10)",
        "",
        f"Command: `{cmd}` | machine: {machine()} | {started} | run `{args.run.relative_to(ROOT) if args.run.is_relative_to(ROOT) else args.run}`"
        f" ({metrics['trials']} trials, test fold {metrics['fold']}, {metrics['n_test']} slices)",
        "",
        "How each choice was made: the temperature and the conformal scores come from the run's held-out "
        f"slices (calibration.json: {cal_how}; half the patients fit T, the other half give the scores). "
        "The prediction set is the conformal set widened to the most probable types whose calibrated "
        "probabilities reach the coverage (so that a set of one type never comes with a lower confidence). "
        "The no-similar-case threshold is 1.1 x the 99.5th percentile of training cases' trunk distance to "
        "the nearest case of another patient. The test fold is read only here.",
        "",
        "Test-fold ECE (10 bins, top label) and NIR prediction sets:",
    ]
    lines += calibration_markdown([metrics])
    lines += [
        "",
        f"Through `POST /query` (the served trial, {len(y)} random test-fold slices, default coverage 0.95): "
        f"accuracy {api_acc:.3f}, ECE of the shown probabilities {expected_calibration_error(shown, y):.3f}, "
        f"mean confidence {shown.max(1).mean():.3f}, answers above 99% {np.mean(shown.max(1) > 0.99):.1%}, "
        f"prediction-set coverage {np.mean(covered):.3f}, mean set size {np.mean(sizes):.2f}; "
        f"answers below 0.9 confidence: {unsure.sum()}, their set coverage "
        f"{np.mean(np.array(covered)[unsure]) if unsure.any() else float('nan'):.3f}, sets of one type among them "
        f"{int((unsure & singles).sum())}; the conformal set alone: coverage {alone_covered.mean():.3f}, "
        f"mean set size {alone.sum(1).mean():.2f}, below 0.9 confidence: coverage "
        f"{alone_covered[unsure].mean() if unsure.any() else float('nan'):.3f}, sets of one type "
        f"{int((unsure & (alone.sum(1) == 1)).sum())} "
        f"({api_flagged} flagged no similar case: the app shows them with no confidence and every class in the set; "
        "the figures count their API probabilities as shown).",
        "",
        "Reliability of NIR on the test fold (soft ensemble of the trials; the run folder also holds "
        "`reliability.png`, written by `neurocbir evaluate`):",
        "",
        "| confidence bin | uncalibrated: confidence / accuracy (n) | calibrated: confidence / accuracy (n) |",
        "|---|---|---|",
    ]
    nir = cal["classifiers"]["nir"]
    before = {b["bin"]: b for b in nir["reliability_before_ensemble"]}
    after = {b["bin"]: b for b in nir["reliability_after_ensemble"]}
    cell = lambda b: f"{b['confidence']:.3f} / {b['accuracy']:.3f} ({b['n']})" if b else "-"  # noqa: E731
    lines += [f"| {k} | {cell(before.get(k))} | {cell(after.get(k))} |" for k in sorted(set(before) | set(after))]
    lines += [
        "",
        f"No similar case (threshold {svc.cases.far_threshold:.4f} in trunk space):",
        "",
        "| input | flagged | of | note |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {n} | {k} | {t} | {note} |" for n, k, t, note in flags]
    body = "\n".join(lines)
    write_section("trust", body)
    print(body)


if __name__ == "__main__":
    main()
