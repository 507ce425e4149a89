"""The mirror's tumor map: should a run that embeds each slice with its mirror (``mirror.json``) also
average the two views' tumor maps (the mirror's flipped back onto the scan)? The mirror view goes
through the network anyway, so the map costs nothing more; what it changes is what the map is used
for: the outline (its Dice) and the "no tumor" rule (the decoder's peak, issue 38 item 5).

Judged on slices no network trained on, for each run given (one per test fold), its tumor maps made
both ways:
- **outline**: median Dice of the largest region at 0.4 and 0.5 against the mask, on the run's
  held-out training patients (figshare) and its held-out TCGA slices whose mask covers >= 1 % (FLAIR
  abnormality, not enhancement);
- **"no tumor"**: leave one run out, as `benchmarks/presence_features.py` (each run's rule chosen on
  the other runs' held-out slices as `neurocbir calibrate --presence` chooses, applied to its own;
  counts summed over the runs), with the decoder's peak read from either map.
Neither a test fold nor the validation part is read.

    .venv/bin/python benchmarks/mirror_map.py --runs runs/cpu-v3-fold1 ... models/lesion-fold5

Each run's held-out slices are scored once per way and kept in ``--cache``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from presence_features import answers, choose, count_answers, rules
from results_doc import machine, write_section

KEYS = ("p", "peak", "tumor", "source", "trained", "fold")
WAYS = {"own": False, "mirror": True}
LEVELS = (0.4, 0.5)


def scored(run: Path, table, cache: Path, mirror: bool) -> dict:
    """A run's training and development slices, their P(no tumor) and decoder peak, the maps made
    from the scan alone or with its mirror."""
    from neurocbir.classify.presence import TumorPresence
    from neurocbir.models.runs import checkpoint_sha256, first_trial
    from neurocbir.training.presence_choice import held_out_slices

    path = cache / f"{checkpoint_sha256(run, first_trial(run), mirror)[:16]}-map.npz"
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in KEYS}
    s, _ = held_out_slices(run, table, mirror=mirror)
    s["p"] = TumorPresence().fit(s["desc"][s["trained"]], s["tumor"][s["trained"]]).proba_no_tumor(s["desc"])
    out = {k: s[k] for k in KEYS}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def dice(prob: np.ndarray, mask: np.ndarray, level: float) -> float:
    from skimage import measure

    regions = measure.label(prob >= level)
    found = regions == 1 + int(np.argmax(np.bincount(regions.ravel())[1:])) if regions.max() else regions > 0
    total = found.sum() + mask.sum()
    return float(2 * (found & mask).sum() / total) if total else 1.0


def outlines(run: Path, table) -> dict:
    """Per way and level: Dice of each held-out slice with a mask (figshare patients; TCGA >= 1 %)."""
    import torch
    import torch.nn.functional as F

    from neurocbir.models.inference import load_model
    from neurocbir.models.runs import TrainConfig
    from neurocbir.training.holdout import development_holdout, holdout_split

    cfg = TrainConfig(**json.loads((run / "config.json").read_text()))
    _, cal_rows = holdout_split(cfg, table)
    dev, _, dev_held, _ = development_holdout(cfg, table)
    items = [("figshare", table, int(i)) for i in cal_rows]  # loaded 32 at a time: a run's slices fill GBs
    for i in dev_held:
        if dev.sources[i] == "tcga-lgg" and dev.tumor[i] and dev.has_mask(i) and dev.load_mask(int(i)).mean() >= 0.01:
            items.append(("tcga-lgg", dev, int(i)))
    out = {}
    for way, mirror in WAYS.items():
        model = load_model(run, mirror=mirror)
        size = model.input_size
        for b in range(0, len(items), 32):
            chunk = [(src, cases.load_image(i), cases.load_mask(i)) for src, cases, i in items[b : b + 32]]
            for (src, _, mask), prob in zip(chunk, model.analyse_batch([im for _, im, _ in chunk])[2]):
                m = torch.from_numpy(np.asarray(mask, np.float32))[None, None]
                m = F.interpolate(m, size=(size, size), mode="area")[0, 0].numpy() >= 0.5
                for level in LEVELS:
                    out.setdefault((way, src, level), []).append(dice(prob, m, level))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="runs of one recipe, one per test fold")
    ap.add_argument("--cache", type=Path, default=Path("runs/presence-features"))
    args = ap.parse_args()
    from neurocbir.data.cases import default_data_dir, load_cases

    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
    table = load_cases(default_data_dir())
    folds = [int(json.loads((r / "config.json").read_text())["fold"]) for r in args.runs]
    if len(set(folds)) < len(folds):
        raise SystemExit("give one run per test fold")
    dice_rows, presence_rows, chosen = [], [], []
    for way, mirror in WAYS.items():
        runs = [scored(r, table, args.cache, mirror) for r in args.runs]
        totals: dict = {}
        for i, fold in enumerate(folds):
            others = [s for j, s in enumerate(runs) if j != i]
            choice = {k: np.concatenate([o[k][o["fold"] != fold] for o in others]) for k in KEYS}
            rule = choose(choice, {r: answers(choice, r) for r in rules()})
            chosen.append(f"{way}, fold {fold}: {rule[1:]}")
            count_answers(totals, runs[i], answers(runs[i], rule))
        sources = sorted({s for s, _ in totals})
        shares = [totals[(s, "none")][0] / totals[(s, "none")][1] for s in sources if totals[(s, "none")][1]]

        def cell(src: str, totals: dict = totals) -> str:
            (fn, nn), (ft, nt) = totals[(src, "none")], totals[(src, "tumor")]
            return (f"{fn / nn:.3f} ({fn}/{nn})" if nn else "-") + (f" / {ft / nt:.3f} ({ft}/{nt})" if nt else " / -")

        presence_rows.append(f"| {way} | " + " | ".join(cell(s) for s in sources) + f" | {np.mean(shares):.3f} |")
    per_run = [(r, outlines(r, table)) for r in args.runs]
    for way in WAYS:
        for src in ("figshare", "tcga-lgg"):
            cells = []
            for level in LEVELS:
                runs_median = [np.median(d[(way, src, level)]) for _, d in per_run if d.get((way, src, level))]
                pooled = np.concatenate([d.get((way, src, level), []) for _, d in per_run])
                cells.append(f"{np.median(pooled):.3f} ({' / '.join(f'{m:.3f}' for m in runs_median)})")
            dice_rows.append(
                f"| {way} | {src} ({sum(len(d.get((way, src, 0.5), [])) for _, d in per_run)}) | "
                + " | ".join(cells)
                + " |"
            )
    body = [
        "## The mirror's tumor map: averaged with the slice's own, on held-out slices (issues 38, 39)",
        "",
        "Command: `python benchmarks/mirror_map.py --runs "
        + " ".join(str(r) for r in args.runs)
        + f"` | machine: {machine()} | {started} | {time.time() - t0:.0f} s",
        "",
        "A run that embeds each slice with its mirror puts both views through the network; its tumor map was the",
        "slice's own. Here the same runs' maps made both ways, from the slice alone (**own**) or as the mean of",
        "both views' maps, the mirror's flipped back (**mirror**), on slices no network trained on. Outline: median",
        "Dice of the largest region at each level against the mask, pooled over the runs (each run's median in",
        "brackets); figshare: the runs' held-out training patients; TCGA: their held-out development slices",
        "whose mask covers >= 1 % (FLAIR abnormality, not enhancement). 'No tumor': leave one run out, as",
        "`benchmarks/presence_features.py` (each run's rule chosen on the other runs' held-out slices, applied to",
        "its own; summed), per source: no-tumor slices called 'no tumor' / tumor slices called 'no tumor'.",
        "Neither a test fold nor the validation part is read.",
        "",
        "| map | slices | Dice at 0.4 | Dice at 0.5 |",
        "|---|---|---|---|",
        *dice_rows,
        "",
        "| map | " + " | ".join(sources) + " | no tumor found, mean over the sources |",
        "|---|" + "---|" * (len(sources) + 1),
        *presence_rows,
        "",
        "Rules chosen (threshold, veto, weight): " + "; ".join(chosen) + ".",
    ]
    write_section("mirror-map", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
