"""Studies, not slices (issue 31): each figshare test patient's slices as one study, answered
once through the app's path (`neurocbir.serving.studies.answer_study`, the demo archive: figshare
folds 1-4 and the external development part): patient-level accuracy, kappa and ECE beside the
slice-level figures; the same studies mixed with slices without a tumor; and POST /query/study
of a 24-slice series (p50 over HTTP).

    .venv/bin/python benchmarks/studies.py [--run models/lesion-fold5]

The study confidence uses the run's study temperature (`study_calibration.json`, fitted on its
training patients held out of training, each as one study; see neurocbir.classify.study), and the
ECE with the slice temperature instead is shown beside it. Nothing is chosen here; fold 5 is read
once, to report.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np

from results_doc import machine, serve_in_thread, write_section


@contextlib.contextmanager
def slice_temperature_only():
    """answer_study as for a run without study_calibration.json (the slice temperature)."""
    from neurocbir.classify import study

    load = study.load
    study.load = lambda run: None
    try:
        yield
    finally:
        study.load = load


def patient_figures(run: Path) -> dict:
    """Each test patient of ``run``'s fold as one study over the run's demo archive, alone and
    mixed with 12 no-tumor validation slices: patient-level accuracy, kappa and ECE (and with
    the slice temperature, where the run has a study temperature), slice-level correctness."""
    from sklearn.metrics import cohen_kappa_score

    from neurocbir.classify.calibration import expected_calibration_error
    from neurocbir.data.cases import CLASS_NAMES, load_cases
    from neurocbir.data.external import development_split, load_external
    from neurocbir.data.studies import Study, StudySlice
    from neurocbir.serving.demo import demo_archive
    from neurocbir.serving.service import RetrievalService
    from neurocbir.serving.studies import answer_study

    svc = RetrievalService.from_archive(run, demo_archive(run))
    table = load_cases()
    fold = svc.model.config.fold
    patients = sorted(set(table.patient_id[table.fold == fold].tolist()))
    ext = load_external(Path(__file__).resolve().parents[2] / "shared" / "data" / "brain-tumor-external-v2")
    _, val = development_split(ext)
    normals = [ext.load_image(i) for i in val if not ext.tumor[i]][:12]
    y, proba, slice_correct, mixed_same, mixed_key, calibrated = [], [], [], [], [], set()
    proba_slice_t: list = []
    for pid in patients:
        rows = np.flatnonzero(table.patient_id == pid)
        slices = [StudySlice(table.load_image(r), None, f"slice{r}") for r in rows]
        out = answer_study(svc, Study(slices, "images"))
        calibrated.add(str(out["calibrated"]))
        if out["calibrated"] == "study":  # the same study with the slice temperature, to compare
            with slice_temperature_only():
                alt = answer_study(svc, Study(slices, "images"))["probabilities"]
            proba_slice_t.append([0.0] * 3 if alt is None else [alt.get(c, 0.0) for c in CLASS_NAMES])
        label = int(table.label[rows[0]])
        y.append(label)
        proba.append(
            [0.0] * 3 if out["probabilities"] is None else [out["probabilities"].get(c, 0.0) for c in CLASS_NAMES]
        )
        slice_correct += [s["prediction"] == CLASS_NAMES[label] for s in out["slices"]]
        mixed = normals[:6] + [s.pixels for s in slices] + normals[6:]
        mixed_out = answer_study(svc, Study([StudySlice(p, None, f"m{i}") for i, p in enumerate(mixed)], "images"))
        mixed_same.append(mixed_out["prediction"] == out["prediction"])
        key = mixed_out["key_slice"]
        mixed_key.append(key is not None and 6 <= key["index"] < 6 + len(slices))
    y, proba = np.array(y), np.array(proba)
    pred = proba.argmax(1)
    answered = proba.sum(1) > 0
    acc = float((pred[answered] == y[answered]).mean())
    kappa = float(cohen_kappa_score(y[answered], pred[answered]))
    ece = expected_calibration_error(proba[answered], y[answered])
    alt_ece = None
    if len(proba_slice_t) == len(y):
        alt_ece = expected_calibration_error(np.array(proba_slice_t)[answered], y[answered])
    return {
        "service": svc,
        "table": table,
        "fold": fold,
        "patients": patients,
        "accuracy": acc,
        "kappa": kappa,
        "ece": ece,
        "answered": answered,
        "calibrated": calibrated,
        "ece_slice_temperature": alt_ece,
        "y": y[answered],
        "proba": proba[answered],
        "proba_slice_temperature": np.array(proba_slice_t)[answered] if alt_ece is not None else None,
        "slice_correct": slice_correct,
        "mixed_same": mixed_same,
        "mixed_key": mixed_key,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("models/lesion-fold5"))
    ap.add_argument("--timing-requests", type=int, default=20)
    ap.add_argument("--section", default="studies", help="the docs/results.md section to write")
    args = ap.parse_args()
    import httpx

    from neurocbir.app.api import create_app
    from neurocbir.retrieval.dicomweb import to_dicom

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.time()
    f = patient_figures(args.run)
    svc, table, fold, patients = f["service"], f["table"], f["fold"], f["patients"]
    acc, kappa, ece, answered, calibrated = f["accuracy"], f["kappa"], f["ece"], f["answered"], f["calibrated"]
    slice_correct, mixed_same, mixed_key = f["slice_correct"], f["mixed_same"], f["mixed_key"]
    alt_row = []
    fit = args.run / "study_calibration.json"
    fitted = json.loads(fit.read_text()) if fit.is_file() else None
    if fitted:
        alt_row.append(f"| the study temperature (fitted: {fitted['how']}) | {fitted['temperature']:.3f} |")
    if f["ece_slice_temperature"] is not None:
        alt_row += [
            f"| patient-level ECE with the run's slice temperature instead | {f['ece_slice_temperature']:.3f} |"
        ]
    # timing: a 24-slice DICOM series over HTTP (the first test patients' slices, repeated to 24)
    rows = [r for pid in patients for r in np.flatnonzero(table.patient_id == pid)][:24]
    files = []
    for n, r in enumerate(rows):
        ds = to_dicom(
            table.load_image(r),
            "BENCH",
            "1.2.3.4",
            "1.2.3.4.1",
            f"1.2.3.4.1.{n + 1}",
            position_mm=6.0 * n,
            instance_number=n + 1,
        )
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        files.append(("files", (f"s{n}.dcm", buf.getvalue(), "application/dicom")))
    url, server = serve_in_thread(create_app(svc))
    times = []
    with httpx.Client(timeout=120) as client:
        for i in range(args.timing_requests + 2):
            t1 = time.perf_counter()
            r = client.post(f"{url}/query/study", files=files)
            assert r.status_code == 200, r.text
            if i >= 2:
                times.append(time.perf_counter() - t1)
    server.should_exit = True
    q = statistics.quantiles(times, n=20)
    body = [
        "## Studies: one answer per patient (issue 31)" + ("" if args.section == "studies" else f", {args.run}"),
        "",
        f"Command: `python benchmarks/studies.py --run {args.run}"
        + (f" --section {args.section}" if args.section != "studies" else "")
        + f"` | machine: {machine()} | {started} | {time.time() - t0:.0f} s",
        "",
        f"Each of fold {fold}'s {len(patients)} test patients' slices as one study (PNG-like slices, no slice spacing), "
        f"answered by `answer_study` over the demo archive ({svc.archive_size} cases: figshare folds 1-4 and the external "
        "development part). The study answer: NIR logits log(1 + I_c) averaged over the slices that show a tumor, "
        f"then softmax with a temperature (calibrated: {', '.join(sorted(calibrated))}); slice probabilities are never "
        "multiplied. Mixed: the same patient's slices between 12 external validation slices without a tumor (6 before, "
        "6 after).",
        "",
        "| figure | value |",
        "|---|---|",
        f"| patient-level accuracy ({int(answered.sum())} of {len(patients)} studies answered with a type) | {acc:.3f} |",
        f"| patient-level Cohen's kappa | {kappa:.3f} |",
        f"| patient-level ECE (10 bins, {int(answered.sum())} studies) | {ece:.3f} |",
        *alt_row,
        f"| slice-level accuracy, the same slices | {np.mean(slice_correct):.3f} ({len(slice_correct)} slices) |",
        f"| mixed with no-tumor slices: the same answer | {np.mean(mixed_same):.3f} |",
        f"| mixed with no-tumor slices: the key slice is one of the patient's | {np.mean(mixed_key):.3f} |",
        f"| POST /query/study, a 24-slice DICOM series over loopback HTTP: p50 / p95 | {statistics.median(times):.2f} s / {q[18]:.2f} s |",
    ]
    if args.section == "studies":
        body += [
            "",
            "Only fold 5 has a served model; the same figures for one run of the CPU recipe per test fold, each "
            "over its own demo archive: benchmarks/studies_across_folds.py.",
        ]
    write_section(args.section, "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
