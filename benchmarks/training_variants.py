"""Runs of one test fold trained differently, compared on slices none of them trained on (issues 38, 39).

    .venv/bin/python benchmarks/training_variants.py --runs models/lesion-fold5 runs/pw05-fold5 [--section S --title T]

Runs of the CPU preset hold 1/7 of the training patients and of the other hospitals' development
groups out of training; runs of the same test fold hold out the same ones, whatever their seed. A
variant is trained with `neurocbir train --out RUN --params P` (P's "best" sets the config, e.g.
`{"best": {"extra": {"cpu_bf16": true, "presence_weight": 0.5}}}`: a linear probe of tumor presence
on the descriptor, trained beside the metric loss; or `{"best": {"epochs": 24}}`); its config's
`extra`, epochs and image size name it below. For each run,
on those held-out slices only (never the test fold, never the validation part):
- **tumor presence**: the archive's presence model (an RBF SVM on the descriptor,
  `neurocbir.classify.presence.TumorPresence`) fitted on the slices the run trained on, as an
  archive fits it; AUROC per source (no tumor against tumor, by P(no tumor), and by the tumor
  decoder's peak alone: the evidence `extra.peak_weight` trains, on every slice with a known mask
  or, with `extra.peak_on` "no_tumor", on slices without a tumor only); and the rule
  `neurocbir calibrate RUN --presence` would choose from this run's held-out slices alone (no
  other fold's run pooled), with its per-source share of no-tumor slices found / tumor slices
  called "no tumor" (TCGA tumors under 1 % of the slice and held-out twins of trained-on slices
  left out, as that choice takes them);
- **tumor type**: NIR kappa and accuracy of the held-out training patients against the other
  training patients (each scan's own embedding, and with its mirror);
- **outline**: the median Dice of the tumor map above 0.5 against the mask, held-out training patients,
  and above the run's own outline level (`tumor_level.json`, what the app draws at: chosen by
  `neurocbir train` on the same held-out slices by the median area error);
- **two networks**: NIR of every pair of the runs, their embeddings concatenated (a small ensemble).
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from itertools import combinations
from pathlib import Path

import numpy as np

from results_doc import machine, write_section

SOURCES = ("br35h", "kaggle-training", "sartaj-training", "tcga-lgg")


def presence(run: Path, table) -> tuple[dict, str, dict]:
    """(AUROC per source, by P(no tumor) and by the decoder's peak, the rule chosen, its
    per-source (found, called none))."""
    from sklearn.metrics import roc_auc_score

    from neurocbir.training.presence_choice import choose_presence, pooled_slices, rates

    s, p, n_twins = pooled_slices(run, table)  # the network's pass over the slices, once
    held = ~s["trained"]
    tumor, source = s["tumor"][held], s["source"][held]
    auc = {}
    for src in SOURCES:
        at = source == src
        both = len(set(tumor[at])) == 2
        auc[src] = tuple(
            roc_auc_score(~tumor[at], score[at]) if both else float("nan") for score in (p[held], -s["peak"][held])
        )
    rule, _ = choose_presence(run, table, save=False, slices=(s, p, n_twins))
    found = rates(rule.no_tumor(p, s["peak"]), s)
    chosen = f"P > {rule.threshold}, veto {rule.decoder_veto}, decoder weight {rule.decoder_weight}"
    return auc, chosen, found


def concatenated(table, a: dict, b: dict, view: str) -> str:
    """NIR "kappa / accuracy" of two runs' held-out embeddings (``view``: "own" or "mirror") concatenated."""
    from neurocbir.training.mirror_choice import nir_scores

    (fit_rows, fit_a, cal_rows, cal_a), (_, fit_b, _, cal_b) = a[view], b[view]
    fit, cal = (np.concatenate([x, y], 1) / np.sqrt(2) for x, y in ((fit_a, fit_b), (cal_a, cal_b)))
    return "{:.3f} / {:.3f}".format(*nir_scores(table, fit_rows, fit, cal_rows, cal))


def recipe_of(cfg: dict) -> str:
    """What a run's config sets beyond the preset: its ``extra``, and its epochs and image size."""
    return f"{json.dumps(cfg.get('extra', {}))}, {cfg['epochs']} epochs, {cfg['image_size']} px"


def same_recipe(configs: list[dict]) -> list[str]:
    """Each run's recipe with its training precision left out (runs that differ only in seed or precision share it)."""
    return [
        json.dumps({k: v for k, v in c.get("extra", {}).items() if k != "cpu_bf16"})
        + f", {c['epochs']} epochs, {c['image_size']} px"
        for c in configs
    ]


def spread_rows(recipes: list[str], figures: list[dict]) -> list[str]:
    """One row per recipe with two runs or more: the range of each held-out figure over its runs."""
    out = []
    for recipe in dict.fromkeys(recipes):
        group = [f for r, f in zip(recipes, figures) if r == recipe]
        if len(group) < 2:
            continue
        cells = " | ".join(
            f"{min(g[key] for g in group):.3f} - {max(g[key] for g in group):.3f} "
            f"({max(g[key] for g in group) - min(g[key] for g in group):.3f})"
            for key in ("kappa_own", "kappa_mirror", "dice")
        )
        out.append(f"| {recipe} | {len(group)} | {cells} |")
    return out


def outline_dice(run: Path, table) -> tuple[float, float, float, int]:
    """Median Dice (map > 0.5, resized to the mask), the run's outline level and the median Dice
    above it, over the held-out training patients' slices."""
    import torch
    import torch.nn.functional as F

    from neurocbir.models.inference import load_model
    from neurocbir.models.runs import TrainConfig
    from neurocbir.training.holdout import holdout_split

    cfg = TrainConfig(**json.loads((run / "config.json").read_text()))
    _, rows = holdout_split(cfg, table)
    model = load_model(run, cfg.first_seed)
    level_file = run / "tumor_level.json"
    level = float(json.loads(level_file.read_text())["level"]) if level_file.is_file() else 0.5
    dice, at_level = [], []
    for r in rows:
        mask = table.load_mask(int(r)) > 0
        prob = model.analyse(table.load_image(int(r)))[2]
        up = F.interpolate(torch.from_numpy(np.asarray(prob, np.float32))[None, None], size=mask.shape, mode="bilinear")
        for out, cut in ((dice, 0.5), (at_level, level)):
            pred = up[0, 0].numpy() > cut
            out.append(2 * (pred & mask).sum() / max(pred.sum() + mask.sum(), 1))
    return float(np.median(dice)), level, float(np.median(at_level)), len(dice)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, nargs="+", required=True, help="runs of one test fold")
    ap.add_argument(
        "--section",
        default="training-variants",
        help=(
            "the section of docs/results.md it writes; another than the default keeps that one (runs of a later "
            "session, compared without the earlier runs, which a new machine no longer holds)"
        ),
    )
    ap.add_argument("--title", default="Training variants of one test fold, on held-out slices (issues 38, 39)")
    args = ap.parse_args()
    from neurocbir.data.cases import default_data_dir, load_cases
    from neurocbir.training.mirror_choice import held_out_embeddings, nir_scores

    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
    table = load_cases(default_data_dir())
    configs = [json.loads((r / "config.json").read_text()) for r in args.runs]
    if len({c["fold"] for c in configs}) != 1:
        raise SystemExit("the runs must share their test fold (the same held-out slices)")
    rows_p, rows_t, views, figures = [], [], {}, []
    named = (
        ""
        if args.section == ap.get_default("section")
        else f" --section {args.section} --title {shlex.quote(args.title)}"
    )
    for run, cfg in zip(args.runs, configs):
        auc, chosen, rates = presence(run, table)
        k, views[run] = {}, {}
        for name, both in (("own", False), ("mirror", True)):
            fit_rows, fit_emb, cal_rows, cal_emb = views[run][name] = held_out_embeddings(run, table, both)
            k[f"kappa_{name}"], k[f"accuracy_{name}"] = nir_scores(table, fit_rows, fit_emb, cal_rows, cal_emb)
        dice, level, dice_level, n_dice = outline_dice(run, table)
        figures.append({**k, "dice": dice})
        timing = json.loads((run / "timings.json").read_text())
        name = f"`{run}` ({recipe_of(cfg)}; seed {cfg['first_seed']}; {timing.get('precision', '?')})"
        cells = " | ".join(
            f"{auc[src][0]:.3f} / {auc[src][1]:.3f}; {rates[src][0]:.3f} / {rates[src][1]:.3f}" if src in rates else "-"
            for src in SOURCES
        )
        rows_p.append(f"| {name} | {chosen} | {cells} |")
        rows_t.append(
            f"| {name} | {k['kappa_own']:.3f} / {k['accuracy_own']:.3f} | {k['kappa_mirror']:.3f} / "
            f"{k['accuracy_mirror']:.3f} | {dice:.3f} ({n_dice}) | {dice_level:.3f} ({level:g}) |"
        )
        print(run, "done", flush=True)
    pairs = [
        f"| `{a}` + `{b}` | {concatenated(table, views[a], views[b], 'own')} | {concatenated(table, views[a], views[b], 'mirror')} |"
        for a, b in combinations(args.runs, 2)
    ]
    held = views[args.runs[0]]["own"][2]  # every run of the fold holds out the same rows
    n_slices, n_patients = len(held), len(np.unique(table.patient_id[held]))
    body = [
        f"## {args.title}",
        "",
        f"Command: `python benchmarks/training_variants.py --runs {' '.join(str(r) for r in args.runs)}{named}` | machine: "
        f"{machine()} | {started} | {time.time() - t0:.0f} s",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        "Presence, per source: AUROC by P(no tumor) / by the decoder's peak (the slice's and its mirror's maps "
        "averaged, as served); the chosen rule's no-tumor slices found / tumor slices called 'no tumor'.",
        "",
        "| run (config extra, epochs, size; seed; training precision) | rule chosen | " + " | ".join(SOURCES) + " |",
        "|---|---|" + "---|" * len(SOURCES),
        *rows_p,
        "",
        f"Tumor type and outline ({n_slices} slices of {n_patients} held-out training patients).",
        "",
        "| run (config extra, epochs, size; seed; training precision) | NIR kappa / accuracy, own | with its mirror | outline Dice median (slices) | above its outline level (level) |",
        "|---|---|---|---|---|",
        *rows_t,
        "",
        "Runs of one recipe that differ only in seed or training precision: the range of each held-out figure",
        "over them (max - min in brackets), the noise a variant's difference must exceed.",
        "",
        "| recipe (config extra without the precision, epochs, size) | runs | NIR kappa, own | with its mirror | outline Dice median |",
        "|---|---|---|---|---|",
        *(spread_rows(same_recipe(configs), figures) or ["| (no two runs of one recipe given) | | | | |"]),
        "",
        "Two runs as one embedding: their embeddings concatenated and scaled by 1/sqrt(2) (a distance is both",
        "runs' distances together), NIR on the same held-out slices. Each scan alone through both networks",
        "costs what one network with the mirror (the served way) does; both networks with their mirrors, twice that.",
        "",
        "| runs | NIR kappa / accuracy, each scan alone | with their mirrors |",
        "|---|---|---|",
        *pairs,
    ]
    write_section(args.section, "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
