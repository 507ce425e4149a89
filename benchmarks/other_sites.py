"""Other hospitals and slices with no tumor (issue 29): the served model on the validation part of
the external slices and on figshare fold 5, through the app's own path (RetrievalService.query),
over four case sources:

* the run's own index (figshare folds 1-4): what the app answered before tumor presence existed;
* archives of figshare folds 1-4 plus 0, 25, 50 and 100 % of the external development part
  (whole groups, a fixed sample): the archive growth curve, with no network retrained.

And the tumor-presence methods compared on the same validation part: the decoder's peak
probability (threshold: at most 2 % of the development part's tumor slices below it), one
nearest neighbour in descriptor space, and the logistic model on descriptors the app uses.

    .venv/bin/python benchmarks/other_sites.py [--run models/lesion-fold5] [--external DIR]

Every choice (the split, the presence model's C and threshold, the decoder threshold) was made on
the development part and figshare training folds; the validation part and fold 5 are read once
per configuration here, to report.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from results_doc import machine, write_section

GROWTH = (0.0, 0.25, 0.5, 1.0)


def embed_all(model, images: list[np.ndarray], batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    embs, descs = [], []
    for b in range(0, len(images), batch):
        e, d = model.embed(images[b : b + batch])
        embs.append(e)
        descs.append(d)
    return np.concatenate(embs), np.concatenate(descs)


def build_archive(root: Path, model, parts: list[tuple]) -> Path:
    """An archive of ``parts`` ((embeddings, descriptors, labels, patients, paths), ...), written
    directly from precomputed embeddings (what `neurocbir add` would store, without re-embedding)."""
    from neurocbir.files import sha256_file
    from neurocbir.retrieval.archive import CaseArchive, CaseRecord

    archive = CaseArchive.create(root, model.embedding_dim, model.checkpoint_sha256)
    records = []
    for emb, desc, labels, patients, paths in parts:
        for e, d, y, pid, path in zip(emb, desc, labels, patients, paths):
            key = sha256_file(path) if Path(path).is_file() else str(path)  # byte-identical files: one case
            records.append(CaseRecord(key, int(y), str(pid), "", None, str(path), e, d))
    archive.add(records)
    archive.close()
    return root


def answers(service, images: list[np.ndarray]) -> list[dict]:
    return [service.query(im, k=5) for im in images]


def figures(out: list[dict], labels: list[str]) -> dict:
    """Tumor-type accuracy and ECE on tumor slices answered with a type, the share of slices
    flagged "no similar case", called "no tumor", and no-tumor slices handled (no tumor or flagged)."""
    from neurocbir.classify.calibration import expected_calibration_error
    from neurocbir.data.cases import CLASS_NAMES, NO_TUMOR

    labels = np.array(labels)
    tumor = labels != NO_TUMOR
    called_none = np.array([o["tumor_found"] is False for o in out])
    far = np.array([o["no_similar_case"] for o in out])
    typed = [i for i in np.flatnonzero(tumor) if out[i]["prediction"] is not None]
    correct = np.array([out[i]["prediction"] == labels[i] for i in typed])
    proba = np.array([[out[i]["probabilities"].get(c, 0.0) for c in CLASS_NAMES] for i in typed])
    y = np.array([CLASS_NAMES.index(labels[i]) for i in typed])
    res = {
        "n_tumor": int(tumor.sum()),
        "n_none": int((~tumor).sum()),
        "accuracy": float(correct.mean()) if len(typed) else float("nan"),
        "accuracy_all_tumor": float(correct.sum() / max(tumor.sum(), 1)),
        "ece": expected_calibration_error(proba, y) if len(typed) else float("nan"),
        "tumor_flagged": float(far[tumor].mean()) if tumor.any() else float("nan"),
        "tumor_called_none": float(called_none[tumor].mean()) if tumor.any() else float("nan"),
    }
    if (~tumor).any():
        res["none_recall"] = float(called_none[~tumor].mean())
        res["none_handled"] = float((called_none | far)[~tumor].mean())
        res["none_typed"] = float(
            np.mean([out[i]["prediction"] is not None and not far[i] for i in np.flatnonzero(~tumor)])
        )
    return res


def outline_dice(out: list[dict], table, rows: np.ndarray) -> float:
    """Median Dice of the outline the app draws (the polygon, rasterised) against the dataset's
    masks; a slice answered without an outline counts 0."""
    from skimage.draw import polygon

    dice = []
    for o, r in zip(out, rows):
        mask, t = table.load_mask(r), o["query_tumor"]
        drawn = np.zeros(mask.shape, bool)
        if t is not None:
            xy = np.array(t["outline"])
            drawn[polygon(xy[:, 1], xy[:, 0], mask.shape)] = True
        dice.append(2 * float((drawn & mask).sum()) / max(int(drawn.sum() + mask.sum()), 1))
    return float(np.median(dice))


def measure_run(run: Path, table, dev, val, shares=GROWTH, peaks: bool = False) -> dict:
    """One run through the app's path: its own index, and archives of figshare's training folds
    plus each share of the development part (whole groups, a fixed sample), on the validation part
    and the run's test fold; with ``peaks``, the decoder's peak on every external slice."""
    from neurocbir.app.service import RetrievalService
    from neurocbir.app.sources import ArchiveCases
    from neurocbir.data.cases import CASE_LABELS, CLASS_NAMES
    from neurocbir.models.inference import load_model
    from neurocbir.models.runs import trial_seeds
    from neurocbir.retrieval.ingest import index_run

    if not trial_seeds(run):
        index_run(run)
    model = load_model(run)
    fold = model.config.fold
    train_rows, test_rows = np.flatnonzero(table.fold != fold), np.flatnonzero(table.fold == fold)
    fig_emb, fig_desc = embed_all(model, [table.load_image(i) for i in train_rows])
    dev_imgs = [dev.load_image(i) for i in range(len(dev))]
    val_imgs = [val.load_image(i) for i in range(len(val))]
    dev_emb, dev_desc = embed_all(model, dev_imgs)
    val_desc = embed_all(model, val_imgs)[1]
    out = {"model": model, "fold": fold, "fig_desc": fig_desc, "dev_desc": dev_desc, "val_desc": val_desc}
    if peaks:
        out["dev_peak"] = np.array([model.analyse(im)[2].max() for im in dev_imgs])
        out["val_peak"] = np.array([model.analyse(im)[2].max() for im in val_imgs])
    test_imgs = [table.load_image(i) for i in test_rows]
    test_labels = [CLASS_NAMES[int(table.label[i])] for i in test_rows]
    val_labels = [str(v) for v in val.labels]
    growth = []
    run_service = RetrievalService.from_run(run)
    own_test = answers(run_service, test_imgs)
    own = {"val": figures(answers(run_service, val_imgs), val_labels), "fold5": figures(own_test, test_labels)}
    own["fold5"]["dice"] = outline_dice(own_test, table, test_rows)
    rng = np.random.default_rng(0)
    groups = np.unique(dev.groups)
    order = rng.permutation(groups)
    fig_part = (
        fig_emb,
        fig_desc,
        table.label[train_rows],
        table.patient_id[train_rows],
        [f"fig{i}" for i in train_rows],
    )
    with tempfile.TemporaryDirectory() as tmp:
        for share in shares:
            keep = np.isin(dev.groups, order[: round(share * len(groups))])
            parts = [fig_part]
            if keep.any():
                lab = np.array([CASE_LABELS.index(v) for v in dev.labels[keep]])
                parts.append(
                    (
                        dev_emb[keep],
                        dev_desc[keep],
                        lab,
                        [f"g{g}" for g in dev.groups[keep]],
                        [str(dev.path(i)) for i in np.flatnonzero(keep)],
                    )
                )
            root = build_archive(Path(tmp) / f"share{share}", model, parts)
            svc = RetrievalService(model, ArchiveCases(root, model.checkpoint_sha256, model.embedding_dim))
            added = svc.cases.size() - len(train_rows)  # byte-identical development files count once
            res = {"share": share, "added": added, "val": figures(answers(svc, val_imgs), val_labels)}
            if share == 1.0:
                test_out = answers(svc, test_imgs)
                res["fold5"] = figures(test_out, test_labels)
                res["fold5"]["dice"] = outline_dice(test_out, table, test_rows)
            growth.append(res)
    return {**out, "own": own, "growth": growth}


def presence_methods(model, dev, val, dev_desc, val_desc, fig_desc, dev_peak, val_peak) -> list[str]:
    """The three tumor-presence rules, each fitted / thresholded on the development part (and the
    figshare training folds as tumor cases), scored on the validation part."""
    from neurocbir.classify.presence import fit_presence

    dev_tumor, val_tumor = dev.tumor, val.tumor
    rows = []
    # decoder peak: the threshold leaving at most 2 % of the development tumor slices below it
    t = float(np.quantile(dev_peak[dev_tumor], 0.02))
    none = val_peak < t
    rows.append((f"the decoder's peak tumor probability (< {t:.3f})", none))
    # nearest neighbour in descriptor space among figshare training + development slices
    ref = np.concatenate([fig_desc, dev_desc])
    ref_tumor = np.concatenate([np.ones(len(fig_desc), bool), dev_tumor])
    d2 = (val_desc**2).sum(1)[:, None] - 2 * val_desc @ ref.T + (ref**2).sum(1)[None]
    rows.append(("nearest neighbour (descriptor) is a no-tumor case", ~ref_tumor[np.argmin(d2, 1)]))
    presence = fit_presence(ref, ref_tumor)
    rows.append(("logistic model on descriptors, P(no tumor) > 0.5 (the app's)", ~presence.predict(val_desc)))
    return [f"| {name} | {none[~val_tumor].mean():.3f} | {none[val_tumor].mean():.3f} |" for name, none in rows]


def pct(v: float) -> str:
    return "-" if v != v else f"{100 * v:.1f} %"


def row(name: str, f: dict, n_added: str = "") -> str:
    """A table row of :func:`figures` (the columns of TABLE_HEAD)."""
    return (
        f"| {name} | {n_added} | {f['accuracy']:.3f} ({f['n_tumor']}) | {f['ece']:.3f} | {pct(f['tumor_flagged'])} | "
        f"{pct(f['tumor_called_none'])} | {pct(f.get('none_handled', float('nan')))} | {pct(f.get('none_recall', float('nan')))} |"
    )


TABLE_HEAD = [
    "| case source | development slices added | tumor-type accuracy (tumor slices) | ECE | tumor slices flagged | "
    "tumor slices called 'no tumor' | no-tumor slices handled | of which answered 'no tumor' |",
    "|---|---|---|---|---|---|---|---|",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("models/lesion-fold5"))
    ap.add_argument("--external", type=Path, default=None)
    args = ap.parse_args()
    from neurocbir.data.cases import CASE_LABELS, default_data_dir, load_cases
    from neurocbir.data.external import default_external_dir, development_split, load_external

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.time()
    data = default_data_dir()
    ext = load_external(args.external or default_external_dir(data))
    dev_rows, val_rows = development_split(ext)
    dev, val = ext.subset(dev_rows), ext.subset(val_rows)
    table = load_cases(data)
    m = measure_run(args.run, table, dev, val, peaks=True)
    model, fold, own, growth = m["model"], m["fold"], m["own"], m["growth"]
    full = growth[-1]
    methods = presence_methods(
        model, dev, val, *(m[k] for k in ("dev_desc", "val_desc", "fig_desc", "dev_peak", "val_peak"))
    )

    n_dev = {str(k): int((dev.labels == k).sum()) for k in CASE_LABELS}
    n_val = {str(k): int((val.labels == k).sum()) for k in CASE_LABELS}
    body = [
        "## Other hospitals and slices with no tumor (issue 29)",
        "",
        f"Command: `python benchmarks/other_sites.py --run {args.run}` | machine: {machine()} | {started} | {time.time() - t0:.0f} s",
        "",
        f"Data: `brain-tumor-external` ({len(ext)} slices from other sources, no patient ids), split by `group` "
        f"(near-duplicates stay together) with scikit-learn's StratifiedGroupKFold (2 folds, shuffled, seed 0: "
        f"`neurocbir.data.external.development_split`) into a **development part** ({len(dev)} slices: {n_dev}) for every "
        f"choice and archive addition, and a **validation part** ({len(val)}: {n_val}) that only reports. "
        f"Served model: `{args.run}` (trained on figshare folds 1-4 only; nothing retrained here). Through the app's path "
        "(`RetrievalService.query`, OpenVINO, calibrated NIR). Accuracy and ECE: tumor slices answered with a type "
        "(in brackets: the tumor slices); flagged: 'no similar case'; no-tumor slices handled: answered 'no tumor' "
        "or flagged.",
        "",
        *TABLE_HEAD,
        "| **validation part of other hospitals' slices** | | | | | | | |",
        row("the run's own index (figshare folds 1-4; tumor presence not assessed)", own["val"], "-"),
        *[
            row(
                f"archive: figshare folds 1-4 + {round(100 * g['share'])} % of the development part",
                g["val"],
                str(g["added"]),
            )
            for g in growth
        ],
        f"| **figshare fold {fold}** | | | | | | | |",
        row("the run's own index", own["fold5"], "-"),
        row(
            "archive: figshare folds 1-4 + the whole development part (what `make demo` serves)",
            full["fold5"],
            str(full["added"]),
        ),
        "",
        f"Outline Dice median on fold {fold} (the polygon the app draws, against the masks; no outline = 0): "
        f"run's own index {own['fold5']['dice']:.3f}, demo archive {full['fold5']['dice']:.3f}.",
        "",
        f"No-tumor slices of the validation part answered with a tumor type (not flagged): run's own index "
        f"{pct(own['val']['none_typed'])}, archive with the development part {pct(full['val']['none_typed'])}.",
        "",
        "Tumor presence, three ways, on the validation part (each fitted or thresholded on the development part "
        "and the figshare training folds; chosen by 5-fold group-wise CV on the development part, see "
        "`neurocbir.classify.presence`):",
        "",
        "| rule | no-tumor slices called 'no tumor' | tumor slices called 'no tumor' |",
        "|---|---|---|",
        *methods,
    ]
    write_section("other-sites", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
