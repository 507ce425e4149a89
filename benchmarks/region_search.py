"""Search by a drawn region (issue 42), through the app's own path (RetrievalService.query over the
archive `make demo` builds), on figshare fold 5 and on the TCGA slices of the version-2 validation
part (the only other-hospital slices with masks; they outline the FLAIR abnormality).

    .venv/bin/python benchmarks/region_search.py [--run models/lesion-fold5] [--n-latency 100]

Each tumor slice is searched by its whole slice, by its tumor's bounding box, by that box 1.5x
and 2x as large (about its centre, clipped to the image), by its true mask, and by a box of the
tumor box's size on tissue away from the tumor (same slice; `neurocbir.data.regions.away_box`,
seeded). Reported: tumor-type accuracy (a "no tumor" answer counts as wrong), ECE of the typed
answers, retrieval mAP of the searched embedding against the run's own index (figshare's
training folds), the share answered "no tumor (in this region)"; and the p50 of POST /query over
loopback with and without a region (interleaved). Nothing is chosen here: the presence threshold
and the calibration of region searches were fitted on held-out training patients
(`neurocbir calibrate RUN --regions`, the run's region_search.json).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from results_doc import machine, serve_in_thread, write_section

KINDS = ("whole slice", "tumor box", "box 1.5x", "box 2x", "true mask", "away box")


def region_of(kind: str, image: np.ndarray, mask: np.ndarray, rng):
    from neurocbir.data.regions import away_box, box_region, mask_region, tumor_box

    if kind == "whole slice":
        return None
    if kind == "true mask":
        return mask_region(mask.astype(np.uint8), image.shape)
    if kind == "away box":
        box = away_box(image, mask, rng)
        return None if box is None else box_region(box, image.shape)
    scale = {"tumor box": 1.0, "box 1.5x": 1.5, "box 2x": 2.0}[kind]
    return box_region(tumor_box(mask, scale), image.shape)


def run_queries(service, images, masks, labels, seed: int) -> tuple[dict, dict]:
    """(answers per kind, searched embeddings per kind); the away boxes drawn with ``seed``."""
    from neurocbir.data.regions import region_on_grid

    rng = np.random.default_rng(seed)
    answers = {k: [] for k in KINDS}
    embeddings = {k: [] for k in KINDS}
    for image, mask in zip(images, masks):
        for kind in KINDS:
            region = region_of(kind, image, mask, rng)
            if kind == "away box" and region is None:
                continue
            answers[kind].append(service.query(image, k=5, region=region))
            grid = None if region is None else region_on_grid(region, service.model.input_size)
            embeddings[kind].append(service.analyse(image, grid)[0][0])
    return answers, {k: np.asarray(v) for k, v in embeddings.items()}


def figures(out: list[dict], labels: np.ndarray) -> dict:
    from neurocbir.classify.calibration import expected_calibration_error
    from neurocbir.data.cases import CLASS_NAMES

    none = np.array([o["tumor_found"] is False for o in out])
    correct = np.array([o["prediction"] == CLASS_NAMES[y] for o, y in zip(out, labels)])
    typed = [i for i, o in enumerate(out) if o["prediction"] is not None]
    proba = np.array([[out[i]["probabilities"].get(c, 0.0) for c in CLASS_NAMES] for i in typed])
    ece = expected_calibration_error(proba, labels[typed]) if len(typed) > 1 else float("nan")
    # a region's "no tumor": the decoder outlines a tumor elsewhere on the slice, or outlines none
    # and the slice's own answer decided (classify.region.presence); whole-slice answers: neither
    blind = np.array([(o["tumor_presence"] or {}).get("located") is False for o in out])
    return {
        "n": len(out),
        "accuracy": float(correct.mean()),
        "ece": ece,
        "none": float(none.mean()),
        "none_elsewhere": float((none & ~blind).mean()),
        "none_slice": float((none & blind).mean()),
    }


def none_cell(f: dict, region: bool) -> str:
    if not region:
        return f"{100 * f['none']:.1f} %"
    return f"{100 * f['none']:.1f} % ({100 * f['none_elsewhere']:.1f} / {100 * f['none_slice']:.1f})"


def retrieval_map(run: Path, emb: np.ndarray, labels: np.ndarray, table) -> float:
    from neurocbir.evaluate.retrieval import retrieval_scores, squared_distances
    from neurocbir.models.runs import trial_dir

    arrays = np.load(trial_dir(run, 0) / "embeddings.npz")
    archive, rows = arrays["archive"], arrays["archive_rows"]
    return retrieval_scores(squared_distances(emb, archive), table.label[rows], labels)["map"]


def latency(service, images, regions, n: int) -> tuple[float, float]:
    """p50 (ms) of POST /query over loopback without and with a region box, interleaved."""
    import httpx

    from neurocbir.app.api import create_app

    base, server = serve_in_thread(create_app(service))
    import io

    from PIL import Image

    def png(im):
        buf = io.BytesIO()
        Image.fromarray(np.clip(im / max(float(im.max()), 1e-6) * 255, 0, 255).astype(np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    files = [png(im) for im in images[:n]]
    times = {False: [], True: []}
    with httpx.Client(base_url=base, timeout=60) as client:
        for i, data in enumerate(files):
            for with_region in (i % 2 == 0, i % 2 == 1):
                form = {"region": ",".join(map(str, regions[i].box))} if with_region else {}
                t0 = time.perf_counter()
                r = client.post("/query", files={"file": ("q.png", data, "image/png")}, data=form)
                times[with_region].append(time.perf_counter() - t0)
                r.raise_for_status()
    server.should_exit = True
    return 1000 * float(np.median(times[False])), 1000 * float(np.median(times[True]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("models/lesion-fold5"))
    ap.add_argument("--n-latency", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="seed of the away boxes")
    args = ap.parse_args()
    from neurocbir.data.cases import CLASS_NAMES, default_data_dir, load_cases
    from neurocbir.data.external import default_external_dir, development_split, load_external
    from neurocbir.data.regions import box_region, tumor_box
    from neurocbir.serving.demo import demo_archive
    from neurocbir.serving.service import RetrievalService

    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
    print(f"seed {args.seed}")
    service = RetrievalService.from_archive(args.run, demo_archive(args.run))
    data = default_data_dir()
    table = load_cases(data)
    fold = service.model.config.fold
    rows = np.flatnonzero(table.fold == fold)
    images = [table.load_image(int(r)) for r in rows]
    masks = [table.load_mask(int(r)) > 0 for r in rows]
    labels = table.label[rows]
    ext = load_external(default_external_dir(data))
    val = ext.subset(development_split(ext)[1])
    tcga = [i for i in np.flatnonzero((val.sources == "tcga-lgg") & val.tumor)]
    t_masks = [val.load_mask(int(i)) for i in tcga]
    tcga = [i for i, m in zip(tcga, t_masks) if m is not None and m.any()]
    t_masks = [m for m in t_masks if m is not None and m.any()]
    t_images = [val.load_image(int(i)) for i in tcga]
    t_labels = np.full(len(tcga), CLASS_NAMES.index("glioma"))

    lines = [
        "## Search by a drawn region (issue 42)",
        "",
        f"Machine: {machine()}; run `{args.run}` over its demo archive; started {started}; away boxes seed {args.seed}.",
        f"Presence threshold and calibration of region searches: {service.region_search.how} "
        f"(threshold {service.region_search.threshold}).",
        "",
    ]
    for name, ims, ms, ys in (
        (f"figshare fold {fold}", images, masks, labels),
        ("TCGA (validation part, FLAIR masks)", t_images, t_masks, t_labels),
    ):
        answers, emb = run_queries(service, ims, ms, ys, args.seed)
        lines += [
            f"**{name}** ({len(ims)} tumor slices)",
            "",
            "| searched by | queries | tumor-type accuracy | ECE | retrieval mAP | answered 'no tumor' (region searches: "
            "decoder outlines a tumor elsewhere / outlines none and the slice says none) |",
            "|---|---|---|---|---|---|",
        ]
        for kind in KINDS:
            if kind == "away box":
                f = figures(answers[kind], np.zeros(len(answers[kind]), int))
                lines.append(f"| {kind} | {f['n']} | - | - | - | {none_cell(f, True)} |")
                continue
            f = figures(answers[kind], ys)
            m = retrieval_map(args.run, emb[kind], ys, table)
            lines.append(
                f"| {kind} | {f['n']} | {f['accuracy']:.3f} | {f['ece']:.3f} | {m:.3f} | "
                f"{none_cell(f, kind != 'whole slice')} |"
            )
        lines.append("")
    boxes = [box_region(tumor_box(m), im.shape) for im, m in zip(images, masks)]
    whole_ms, region_ms = latency(service, images, boxes, args.n_latency)
    lines.append(
        f"POST /query over loopback, {args.n_latency} fold-{fold} slices each way, interleaved: p50 whole slice "
        f"{whole_ms:.1f} ms, with a region box {region_ms:.1f} ms ({region_ms - whole_ms:+.1f} ms)."
    )
    lines.append(f"\n`.venv/bin/python benchmarks/region_search.py --run {args.run}` ({time.time() - t0:.0f} s).")
    write_section("region-search", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
