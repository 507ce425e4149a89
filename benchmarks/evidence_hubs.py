"""Which archive cases are everyone's nearest, and how far the typed evidence lies (issue 38):
on slices a run never trained on, never the test fold or the validation part.

    .venv/bin/python benchmarks/evidence_hubs.py [--run models/lesion-fold5]

The archive is what the run trained on, as an archive holds it: its training patients (less the
held-out ones) and the development groups it trained on, each embedded as the app embeds them.
The queries are its held-out training patients and its held-out development groups, every label
(no tumor and type unknown too). Reported: the archive cases of a tumor type that are among the
5 nearest typed cases of the most queries (their source, the share of the slice their tumor
covers, the decoder's peak on them), how many queries of each source and label have one of the
five in their 5 nearest, and how many lie beyond the run's evidence reach (``evidence_reach.json``:
"no close tumor case"), their 5th nearest typed case farther than it.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import numpy as np

from results_doc import machine, write_section

TOP = 5


def embed(model, load, rows) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, the decoder's peak) of the development rows, 32 at a time."""
    emb, peak = [], []
    for b in range(0, len(rows), 32):
        e, _, probs = model.analyse_batch([load(int(i)) for i in rows[b : b + 32]])
        emb.append(e)
        peak += [float(p.max()) for p in probs]
    return np.concatenate(emb), np.array(peak)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("models/lesion-fold5"))
    ap.add_argument("--section", default="evidence-hubs")
    args = ap.parse_args()
    from neurocbir.classify import reach
    from neurocbir.data.cases import default_data_dir, load_cases
    from neurocbir.data.external import load_external, part
    from neurocbir.models.inference import load_model
    from neurocbir.training.holdout import extra_holdout_split, holdout_embeddings

    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
    table = load_cases(default_data_dir())
    cfg, fit_rows, cal_rows, fit_emb, cal_emb = holdout_embeddings(args.run, table)
    dev = part(load_external(cfg.extra_cases), "development")
    dfit, dheld = extra_holdout_split(cfg, dev)
    model = load_model(args.run, cfg.first_seed)
    de_fit, dp_fit = embed(model, dev.load_image, dfit)
    de_held, _ = embed(model, dev.load_image, dheld)
    typed = dev.label_index[dfit] >= 0
    archive = np.vstack([fit_emb, de_fit[typed]])
    a_src = np.concatenate([np.full(len(fit_emb), "figshare"), dev.sources[dfit][typed].astype(str)])
    a_peak = np.concatenate([np.full(len(fit_emb), np.nan), dp_fit[typed]])
    share = [-1.0] * len(fit_emb) + [
        float((m > 0).mean()) if (m := dev.load_mask(int(i))) is not None else -1.0 for i in dfit[typed]
    ]
    queries = np.vstack([cal_emb, de_held])
    q_src = np.concatenate([np.full(len(cal_emb), "figshare"), dev.sources[dheld].astype(str)])
    q_lab = np.concatenate([np.full(len(cal_emb), "typed"), dev.labels[dheld].astype(str)])
    cos = queries @ archive.T
    nearest = np.argsort(-cos, axis=1)[:, :TOP]
    fifth = 2.0 - 2.0 * np.sort(cos, axis=1)[:, -TOP]
    hubs = collections.Counter(nearest.ravel()).most_common(TOP)
    limit = reach.load(args.run)
    lines = [
        "## Everyone's nearest case: the archive's hubs, on held-out slices (issue 38)",
        "",
        f"Command: `python benchmarks/evidence_hubs.py --run {args.run}` | machine: {machine()} | {started} | "
        f"{time.time() - t0:.0f} s",
        "",
        f"Archive: the {len(fit_emb)} figshare slices and {int(typed.sum())} typed development slices `{args.run}` "
        f"trained on; queries: its {len(cal_emb)} held-out training slices and {len(dheld)} held-out development "
        "slices of every label. The validation part and the test fold are not read.",
        "",
        f"The {TOP} archive cases most often among the {TOP} nearest typed cases of a query:",
        "",
        "| archive case | source | tumor's share of the slice | decoder's peak | queries with it in their 5 nearest |",
        "|---|---|---|---|---|",
    ]
    for i, n in hubs:
        cover = "-" if share[i] < 0 else f"{share[i]:.2%}"
        peak = "-" if np.isnan(a_peak[i]) else f"{a_peak[i]:.2f}"
        lines.append(f"| {i} | {a_src[i]} | {cover} | {peak} | {n} of {len(queries)} |")
    reach_head = "beyond the reach" if limit is None else f"beyond the reach ({limit.threshold:.3f})"
    lines += [
        "",
        f"| queries: source, label | n | with one of those {TOP} in their {TOP} nearest | 5th nearest typed case: "
        f"median distance | {reach_head} |",
        "|---|---|---|---|---|",
    ]
    hub_ids = [i for i, _ in hubs]
    for src, lab in sorted(set(zip(q_src, q_lab))):
        sel = (q_src == src) & (q_lab == lab)
        with_hub = np.isin(nearest[sel], hub_ids).any(1).mean()
        beyond = "-" if limit is None else f"{np.mean(fifth[sel] > limit.threshold):.1%}"
        lines.append(f"| {src}, {lab} | {sel.sum()} | {with_hub:.1%} | {np.median(fifth[sel]):.3f} | {beyond} |")
    body = "\n".join(lines)
    print(body)
    write_section(args.section, body)


if __name__ == "__main__":
    main()
