"""Other hospitals, per source (issue 38): a run through the app's own path (RetrievalService.query,
OpenVINO, calibrated NIR) on the validation part of `brain-tumor-external-v2`, each source apart,
over the archive `make demo` builds (figshare's training folds + the development part), and the
archive growth curve (the development part added 0, 25, 50, 100 %, no network retrained).

    .venv/bin/python benchmarks/other_sites.py [--run RUN] [--section other-sites]

Per source: tumor-type accuracy and ECE where the type is known, slices flagged 'no similar case',
tumor slices called 'no tumor' (TCGA: by the mask's share of the slice), no-tumor slices handled
('no tumor', or flagged), and the slices answered with a type but "tumor presence uncertain" (the
presence rule's score said "no tumor", the decoder's veto kept a tumor) or "no close tumor case" (the 5th
nearest typed case beyond the run's evidence reach: no confidence shown, no type ruled out), and the
accuracy and ECE of the typed slices whose answer shows a confidence. TCGA: outline Dice against its masks (they outline the FLAIR
abnormality, not the enhancement: larger than what a T1c outline shows), and every validation
patient's whole series sent as one study (its answer, its key slice against the tumor's slice
range, presence slice by slice). Figshare fold 5 over the same archive and over the run's own index.

Nothing is chosen here: the split, the presence rule and every threshold were fixed on the
development part and figshare's training folds; the validation part and fold 5 are read once per
configuration, to report.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from results_doc import machine, write_section

GROWTH = (0.0, 0.25, 0.5, 1.0)
SMALL_TUMOR = 0.01  # a TCGA mask covering less of the slice than this is a small tumor


def embed_all(model, images: list[np.ndarray], batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    embs, descs = [], []
    for b in range(0, len(images), batch):
        e, d = model.embed(images[b : b + batch])
        embs.append(e)
        descs.append(d)
    return np.concatenate(embs), np.concatenate(descs)


def build_archive(root: Path, model, parts: list[tuple]) -> Path:
    """An archive of ``parts`` ((embeddings, descriptors, labels, patients, paths, images), ...),
    written directly from precomputed embeddings (what `neurocbir add` would store, fingerprints
    included, without re-embedding)."""
    from neurocbir.files import sha256_file
    from neurocbir.retrieval.archive import CaseArchive, CaseRecord
    from neurocbir.retrieval.duplicates import ImagePrints

    archive = CaseArchive.create(root, model.embedding_dim, model.checkpoint_sha256)
    records = []
    for emb, desc, labels, patients, paths, images in parts:
        for e, d, y, pid, path, im in zip(emb, desc, labels, patients, paths, images):
            key = sha256_file(path) if Path(path).is_file() else str(path)  # byte-identical files: one case
            records.append(
                CaseRecord(key, int(y), str(pid), "", None, str(path), e, d, fingerprint=ImagePrints(im).stored)
            )
    archive.add(records)
    archive.close()
    return root


def answers(service, images: list[np.ndarray]) -> list[dict]:
    return [service.query(im, k=5) for im in images]


def figures(out: list[dict], labels) -> dict:
    """Tumor-type accuracy and ECE on slices of a known type answered with a type, the share of
    slices flagged "no similar case", tumor slices called "no tumor", no-tumor slices handled."""
    from neurocbir.classify.calibration import expected_calibration_error
    from neurocbir.data.cases import CLASS_NAMES, NO_TUMOR

    labels = np.asarray(labels)
    tumor, typed_label = labels != NO_TUMOR, np.isin(labels, CLASS_NAMES)
    called_none = np.array([o["tumor_found"] is False for o in out], dtype=bool)
    far = np.array([o["no_similar_case"] for o in out], dtype=bool)
    unsure = np.array([bool(o.get("presence_warning")) for o in out], dtype=bool)
    distant = np.array([bool(o.get("no_close_tumor_case")) for o in out], dtype=bool)
    typed = [i for i in np.flatnonzero(typed_label) if out[i]["prediction"] is not None]
    correct = np.array([out[i]["prediction"] == labels[i] for i in typed])
    proba = np.array([[out[i]["probabilities"].get(c, 0.0) for c in CLASS_NAMES] for i in typed])
    y = np.array([CLASS_NAMES.index(labels[i]) for i in typed])
    shown = np.array([bool(out[i]["calibration_applies"]) for i in typed], dtype=bool)  # a confidence shown
    nan = float("nan")
    return {
        "n_typed": int(typed_label.sum()),
        "n_tumor": int(tumor.sum()),
        "n_none": int((~tumor).sum()),
        "accuracy": float(correct.mean()) if len(typed) else nan,
        "ece": expected_calibration_error(proba, y) if len(typed) > 1 else nan,
        "flagged": float(far.mean()) if len(out) else nan,
        "tumor_called_none": float(called_none[tumor].mean()) if tumor.any() else nan,
        "none_handled": float((called_none | far)[~tumor].mean()) if (~tumor).any() else nan,
        "none_called_none": float(called_none[~tumor].mean()) if (~tumor).any() else nan,
        "tumor_unsure": float(unsure[tumor].mean()) if tumor.any() else nan,
        "none_unsure": float(unsure[~tumor].mean()) if (~tumor).any() else nan,
        "tumor_distant": float(distant[tumor].mean()) if tumor.any() else nan,
        "none_distant": float(distant[~tumor].mean()) if (~tumor).any() else nan,
        "n_shown": int(shown.sum()),
        "accuracy_shown": float(correct[shown].mean()) if shown.any() else nan,
        "ece_shown": expected_calibration_error(proba[shown], y[shown]) if shown.sum() > 1 else nan,
    }


def drawn_mask(answer: dict, shape) -> np.ndarray:
    from skimage.draw import polygon

    drawn = np.zeros(shape, bool)
    t = answer.get("query_tumor")
    if t is not None:
        xy = np.array(t["outline"])
        drawn[polygon(xy[:, 1], xy[:, 0], shape)] = True
    return drawn


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(int(a.sum() + b.sum()), 1)


def pct(v: float) -> str:
    return "-" if v != v else f"{100 * v:.1f} %"


def num(v: float) -> str:
    return "-" if v != v else f"{v:.3f}"


def source_rows(out: list[dict], ext, tcga_share: np.ndarray) -> list[str]:
    """One table row per source (TCGA also by tumor size)."""
    rows = []
    groups = [(s, ext.sources == s) for s in np.unique(ext.sources)]
    tcga = ext.sources == "tcga-lgg"
    if tcga.any():
        groups += [
            (f"tcga-lgg, mask >= {SMALL_TUMOR:.0%} of the slice", tcga & ((tcga_share >= SMALL_TUMOR) | ~ext.tumor)),
            (f"tcga-lgg, mask < {SMALL_TUMOR:.0%} of the slice", tcga & ((tcga_share < SMALL_TUMOR) | ~ext.tumor)),
        ]
    for name, sel in groups:
        f = figures([out[i] for i in np.flatnonzero(sel)], ext.labels[sel])
        rows.append(
            f"| {name} | {f['n_tumor']} ({f['n_typed']} typed) / {f['n_none']} | {num(f['accuracy'])} | {num(f['ece'])} | "
            f"{pct(f['flagged'])} | {pct(f['tumor_called_none'])} | {pct(f['none_handled'])} | {pct(f['none_called_none'])} | "
            f"{pct(f['tumor_unsure'])} / {pct(f['none_unsure'])} | {pct(f['tumor_distant'])} / {pct(f['none_distant'])} | "
            f"{f['n_shown']}: {num(f['accuracy_shown'])} / {num(f['ece_shown'])} |"
        )
    return rows


HEAD = [
    "| source | slices: tumor (type known) / no tumor | tumor-type accuracy | ECE | flagged 'no similar case' | "
    "tumor slices called 'no tumor' | no-tumor slices handled | of which 'no tumor' | "
    "answered 'tumor presence uncertain': tumor / no-tumor slices | answered 'no close tumor case': tumor / "
    "no-tumor slices | typed slices with a confidence shown: accuracy / ECE |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]


def series_figures(service, val, tcga_share: np.ndarray) -> tuple[list[str], dict]:
    """Every TCGA validation patient's series as one study."""
    from neurocbir.data.studies import Study, StudySlice
    from neurocbir.serving.studies import answer_study

    lines, n, glioma, key_in, none_ok, tumor_ok, n_none, n_tumor = [], 0, 0, 0, 0, 0, 0, 0
    answers_by = {}
    for p in sorted(set(val.patients[val.sources == "tcga-lgg"].tolist())):
        rows = np.flatnonzero(val.patients == p)
        rows = rows[np.argsort([int(s) for s in val.slices[rows]])]
        study = Study([StudySlice(val.load_image(int(r)), None, str(val.files[r])) for r in rows], "images")
        out = answer_study(service, study)
        n += 1
        answers_by[out["prediction"]] = answers_by.get(out["prediction"], 0) + 1
        glioma += out["prediction"] == "glioma"
        tumor_slices = np.flatnonzero(val.tumor[rows])
        if out["key_slice"] is not None and len(tumor_slices):
            key_in += tumor_slices.min() <= out["key_slice"]["index"] <= tumor_slices.max()
        called_none = np.array([s["tumor_found"] is False for s in out["slices"]])
        none_ok += int(called_none[~val.tumor[rows]].sum())
        n_none += int((~val.tumor[rows]).sum())
        big = val.tumor[rows] & (tcga_share[rows] >= SMALL_TUMOR)
        tumor_ok += int((~called_none[big]).sum())
        n_tumor += int(big.sum())
    stats = {"n": n, "glioma": glioma, "key_in": key_in, "answers": answers_by}
    lines = [
        f"| patients (validation part) | {n} |",
        f"| study answered 'glioma' | {glioma} of {n} ({pct(glioma / max(n, 1))}); all answers: {answers_by} |",
        f"| key slice inside the tumor's slice range | {key_in} of {n} ({pct(key_in / max(n, 1))}) |",
        f"| along the series: no-tumor slices answered 'no tumor' | {none_ok} of {n_none} ({pct(none_ok / max(n_none, 1))}) |",
        f"| along the series: tumor slices (mask >= {SMALL_TUMOR:.0%}) not called 'no tumor' | {tumor_ok} of {n_tumor} ({pct(tumor_ok / max(n_tumor, 1))}) |",
    ]
    return lines, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("models/lesion-fold5"))
    ap.add_argument("--section", default="other-sites")
    ap.add_argument("--no-growth", action="store_true", help="only the whole development part")
    args = ap.parse_args()
    from neurocbir.data.cases import CLASS_NAMES, default_data_dir, load_cases
    from neurocbir.data.external import default_external_dir, development_split, load_external
    from neurocbir.models.inference import load_model
    from neurocbir.models.runs import trial_seeds
    from neurocbir.retrieval.ingest import index_run
    from neurocbir.serving.archive_cases import ArchiveCases
    from neurocbir.serving.service import RetrievalService

    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
    data = default_data_dir()
    ext_dir = default_external_dir(data)
    ext = load_external(ext_dir)
    dev_rows, val_rows = development_split(ext)
    dev, val = ext.subset(dev_rows), ext.subset(val_rows)
    table = load_cases(data)
    if not trial_seeds(args.run):
        index_run(args.run)
    model = load_model(args.run)
    fold = model.config.fold
    train_rows, test_rows = np.flatnonzero(table.fold != fold), np.flatnonzero(table.fold == fold)
    fig_imgs = [table.load_image(i) for i in train_rows]
    fig_emb, fig_desc = embed_all(model, fig_imgs)
    dev_imgs = [dev.load_image(i) for i in range(len(dev))]
    val_imgs = [val.load_image(i) for i in range(len(val))]
    dev_emb, dev_desc = embed_all(model, dev_imgs)
    test_imgs = [table.load_image(i) for i in test_rows]
    test_labels = [CLASS_NAMES[int(table.label[i])] for i in test_rows]
    masks = [val.load_mask(i) if val.mask_files[i] else None for i in range(len(val))]
    share = np.array([m.mean() if m is not None else 0.0 for m in masks])
    fig_part = (
        fig_emb,
        fig_desc,
        table.label[train_rows],
        table.patient_id[train_rows],
        [f"fig{i}" for i in train_rows],
        fig_imgs,
    )
    order = np.random.default_rng(0).permutation(np.unique(dev.groups))
    growth, full = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for g in GROWTH if not args.no_growth else (1.0,):
            keep = np.isin(dev.groups, order[: round(g * len(order))])
            parts = [fig_part]
            if keep.any():
                k = np.flatnonzero(keep)
                parts.append(
                    (
                        dev_emb[k],
                        dev_desc[k],
                        dev.case_label[k],
                        [f"{dev.sources[i]}:{dev.patients[i] or dev.groups[i]}" for i in k],
                        [str(dev.path(i)) for i in k],
                        [dev_imgs[i] for i in k],
                    )
                )
            root = build_archive(Path(tmp) / f"share{g}", model, parts)
            svc = RetrievalService(model, ArchiveCases(root, model.checkpoint_sha256, model.embedding_dim))
            out = answers(svc, val_imgs)
            growth.append((g, int(keep.sum()), out))
            if g == 1.0:
                full = (svc, out)
                series_lines, series = series_figures(svc, val, share)
                test_out = answers(svc, test_imgs)
        own_test = answers(RetrievalService.from_run(args.run), test_imgs)
    svc, out = full
    tcga_big = np.flatnonzero((val.sources == "tcga-lgg") & val.tumor & (share >= SMALL_TUMOR))
    tcga_dice = [dice(drawn_mask(out[i], masks[i].shape), masks[i]) for i in tcga_big]
    fig5 = figures(test_out, test_labels)
    own5 = figures(own_test, test_labels)
    fig_dice = float(
        np.median(
            [dice(drawn_mask(o, table.load_mask(r).shape), table.load_mask(r)) for o, r in zip(test_out, test_rows)]
        )
    )
    n_val = {str(s): int((val.sources == s).sum()) for s in np.unique(val.sources)}
    body = [
        f"## Other hospitals, per source: {args.run} (issue 38)",
        "",
        f"Command: `python benchmarks/other_sites.py --run {args.run} --section {args.section}` | machine: {machine()} | {started} | {time.time() - t0:.0f} s",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        f"Data: `{ext_dir.name}` ({len(ext)} slices), split by `group` (a TCGA patient; near-duplicates, mirrors "
        f"included, elsewhere) with StratifiedGroupKFold by source and label (2 folds, seed 0: "
        f"`neurocbir.data.external.development_split`): development part {len(dev)} slices, validation part "
        f"{len(val)} ({n_val}). Run: `{args.run}` ({'trained with the development part' if model.config.extra_cases else 'trained on figshare folds 1-4 only'}). "
        f"Archive: figshare folds 1-4 ({len(train_rows)}) + the development part ({len(dev)}).",
        "",
        "### Validation part, per source",
        "",
        *HEAD,
        *source_rows(out, val, share),
        "",
        f"TCGA outline Dice (the polygon the app draws against the FLAIR-abnormality mask; slices whose mask covers >= "
        f"{SMALL_TUMOR:.0%}; no outline = 0): median {np.median(tcga_dice):.3f} over {len(tcga_dice)} slices.",
        "",
        "### TCGA validation patients, each series as one study",
        "",
        "| | |",
        "|---|---|",
        *series_lines,
        "",
        f"### Figshare fold {fold} (664 slices)",
        "",
        "| case source | accuracy | ECE | tumor slices called 'no tumor' | answered 'no close tumor case' | "
        "with a confidence shown: accuracy / ECE | outline Dice median |",
        "|---|---|---|---|---|---|---|",
        f"| the run's own index (folds 1-4) | {num(own5['accuracy'])} | {num(own5['ece'])} | {pct(own5['tumor_called_none'])} | "
        f"{pct(own5['tumor_distant'])} | {own5['n_shown']}: {num(own5['accuracy_shown'])} / {num(own5['ece_shown'])} | |",
        f"| the archive above (what `make demo` serves) | {num(fig5['accuracy'])} | {num(fig5['ece'])} | {pct(fig5['tumor_called_none'])} | "
        f"{pct(fig5['tumor_distant'])} | {fig5['n_shown']}: {num(fig5['accuracy_shown'])} / {num(fig5['ece_shown'])} | {fig_dice:.3f} |",
    ]
    if len(growth) > 1:
        body += [
            "",
            "### A new site teaches the archive: the development part added, no retraining",
            "",
            "Whole groups in a fixed random order (seed 0); validation part, per source: no-tumor slices handled "
            "(of which answered 'no tumor') / tumor slices called 'no tumor' / tumor-type accuracy where known. "
            "With none of the development part added the archive holds no slice without a tumor: presence is "
            "not assessed, and a no-tumor slice counts as handled only by being flagged 'no similar case'.",
            "",
            "| development slices added | " + " | ".join(np.unique(val.sources)) + " |",
            "|---|" + "---|" * len(np.unique(val.sources)),
        ]
        for g, n_added, o in growth:
            cells = []
            for s in np.unique(val.sources):
                sel = np.flatnonzero(val.sources == s)
                f = figures([o[i] for i in sel], val.labels[sel])
                cells.append(
                    f"{pct(f['none_handled'])} ({pct(f['none_called_none'])}) / {pct(f['tumor_called_none'])} / "
                    f"{num(f['accuracy'])}"
                )
            body.append(f"| {round(100 * g)} % ({n_added}) | " + " | ".join(cells) + " |")
    write_section(args.section, "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
