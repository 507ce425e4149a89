"""Does the shown confidence still hold when the archive grows (issue 41)? NIR's evidence for a type
is its position: how many of the nearest cases share the type before the first case of another.
The calibration maps ``log(1 + position)`` to a probability, fitted on held-out training patients
against an archive of a few thousand cases; a position grows where an archive grows denser, and the
app's search stops at a cap (``SearchedCases.nir_cap``, 4096).

    .venv/bin/python benchmarks/scale_confidence.py [--sizes 100000] [--depths 16 64 256 1024]

Figshare fold 5 (never in any archive) is queried through the app's path (RetrievalService.query)
over the demo archive and over synthetic archives of N cases made from it on the served model's
class manifolds (benchmarks/app_scale.py `build`, a FAISS flat store). Rows: **the app** (the
confidence each answer showed, with the run's calibration: `calibration.json` says to what depth
it reads NIR's positions, :func:`neurocbir.classify.calibration.nir_depth`); then each answer's
positions read to depth K (all: up to the app's cap) with a calibration fitted at that depth on
the run's held-out patients, as `neurocbir calibrate` fits it (its temperature at the run's own
depth is printed beside the run's, to check that it is the same fit). Per archive and row:
tumor-type accuracy (answers with a type; reading fewer positions changes no type) and ECE, the
mean confidence, the median position of the answer's type as read, and the share at the depth.
Nothing is chosen here: the validation part is not read, fold 5 is read to report.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from app_scale import ROOT, build
from results_doc import machine, write_section


def held_out_neighbours(run: Path, table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(neighbour labels, types, patients) of the run's held-out calibration queries, as
    `neurocbir calibrate` makes them (:func:`neurocbir.training.lesion_run.held_out_neighbours`)."""
    from neurocbir.classify.calibration import held_out_labels
    from neurocbir.training.lesion_run import held_out_neighbours as calibration_queries

    _, _, lists, y, groups, _, _ = calibration_queries(run, table)
    return held_out_labels(lists), np.concatenate(y), np.concatenate(groups)


def calibrated_at(depth: int | None, labels: np.ndarray, y: np.ndarray, groups: np.ndarray):
    from neurocbir.classify.calibration import Calibrator
    from neurocbir.classify.neighbors import nir_positions
    from neurocbir.data.cases import CLASS_NAMES

    cut = labels if depth is None else labels[:, :depth]
    return Calibrator.fit(np.log1p(nir_positions(cut, len(CLASS_NAMES)).astype(float)), y, groups)


def figures(proba: np.ndarray, y: np.ndarray, top: np.ndarray, depth: int) -> str:
    from neurocbir.classify.calibration import expected_calibration_error

    return (
        f"{np.mean(proba.argmax(1) == y):.3f} | {expected_calibration_error(proba, y):.3f} | "
        f"{proba.max(1).mean():.3f} | {np.median(top):.0f} | {100 * np.mean(top >= depth):.1f} %"
    )


def read_to(depth: int, positions: np.ndarray, calibrator) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, the answer's position) of answers whose positions are read to ``depth``."""
    pos = np.minimum(positions, depth)
    proba = calibrator.proba(np.log1p(pos.astype(float)))
    return proba, pos[np.arange(len(pos)), proba.argmax(1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "models" / "lesion-fold5")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    ap.add_argument("--depths", type=int, nargs="+", default=[16, 64, 256, 1024])
    ap.add_argument("--queries", type=int, default=None, help="the first N fold-5 slices only (default: all)")
    args = ap.parse_args()
    from neurocbir.classify import calibration
    from neurocbir.data.cases import CLASS_NAMES, load_cases
    from neurocbir.serving.demo import demo_archive
    from neurocbir.serving.service import RetrievalService
    from neurocbir.serving.sources import SearchedCases

    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
    table = load_cases()
    labels, y_held, groups = held_out_neighbours(args.run, table)
    served = calibration.load(args.run)["nir"]
    cap = SearchedCases.nir_cap
    depths = [*args.depths, cap]
    refit = {d: calibrated_at(None if d == cap else d, labels, y_held, groups) for d in depths}
    check = calibrated_at(served.depth, labels, y_held, groups).temperature
    rows = np.flatnonzero(table.fold == 5)[: args.queries]
    images, y = [table.load_image(int(r)) for r in rows], table.label[rows]
    lines = []
    with tempfile.TemporaryDirectory(dir=ROOT / "cache") as tmp:
        for n in [0, *args.sizes]:
            archive = demo_archive(args.run) if n == 0 else Path(tmp) / f"archive-{n}"
            built = 0.0 if n == 0 else build(archive, demo_archive(args.run), n, "flat", None)
            service = RetrievalService.from_archive(args.run, archive)
            name = f"the demo archive ({service.cases.size():,} cases)" if n == 0 else f"{n:,} synthetic"
            out = [service.query(im, k=5) for im in images]
            typed = [i for i, o in enumerate(out) if o["prediction"] is not None]
            pos = np.array([[out[i]["nir_positions"][c] for c in CLASS_NAMES] for i in typed])
            yt = y[typed]
            shown = np.array([[out[i]["probabilities"][c] for c in CLASS_NAMES] for i in typed])
            app_depth = served.depth or cap
            top = np.minimum(pos[np.arange(len(pos)), shown.argmax(1)], app_depth)
            lines.append(
                f"| {name} | the app (depth {app_depth}) | {len(typed)} | {figures(shown, yt, top, app_depth)} |"
            )
            for d in depths:
                proba, top = read_to(d, pos, refit[d])
                way = f"all (the cap, {cap})" if d == cap else f"depth {d}"
                lines.append(
                    f"| {name} | {way}, calibrated there (T {refit[d].temperature:.2f}) | {len(typed)} | "
                    f"{figures(proba, yt, top, d)} |"
                )
            print("\n".join(lines[-1 - len(depths) :]), f"(built in {built:.0f} s)", flush=True)
            del service
    body = [
        "## Confidence as the archive grows (issue 41)",
        "",
        f"Command: `python benchmarks/scale_confidence.py --sizes {' '.join(map(str, args.sizes))} --depths "
        f"{' '.join(map(str, args.depths))}{'' if args.queries is None else f' --queries {args.queries}'}` | "
        f"machine: {machine()} | {started} | {time.time() - t0:.0f} s",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        f"Figshare fold 5: {len(rows)} tumor slices. The run's calibration (`{args.run}/calibration.json`): "
        f"temperature {served.temperature:.3f} at depth {served.depth}; fitted again here at that depth: {check:.3f}.",
        "",
        "| archive | positions read | answered with a type | accuracy | ECE | mean confidence | median position | at the depth |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
    ]
    write_section("scale-confidence", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
