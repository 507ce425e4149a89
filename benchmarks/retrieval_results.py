"""Retrieval figures for docs/results.md (issue 32): mean average precision over the whole archive
ranking and precision at 1 / 5 / 10 (relevant = same tumor type), over every archive slice and
with one slice per patient, for each run given, beside the published figures on this dataset.

    .venv/bin/python benchmarks/retrieval_results.py models/lesion-fold5 [runs/mine ...]

Each run is evaluated as it is on disk (`neurocbir evaluate` computes the same figures); a run
trained elsewhere (the committed model) is indexed first. The test patients are never in the
archive. The test fold is read once per run, to report; nothing here is chosen.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from results_doc import machine, write_section

#: published patient-wise five-fold figures on the same dataset (mAP over the whole ranking)
PUBLISHED = (
    ("Cheng et al. 2016 (Fisher vectors, adaptive spatial pooling), PLoS ONE", "5-fold", "0.947"),
    ("Swati et al. 2019 (VGG19 fine-tuned, closed-form metric learning), IEEE Access", "5-fold", "0.961"),
)


def describe(run: Path, cfg: dict) -> str:
    extra = f", {cfg.get('image_size', 224)} px" if cfg.get("recipe") == "lesion" else ""
    return f"`{run}` ({cfg.get('recipe', 'cached')} recipe, {cfg['encoder']}{extra})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    args = ap.parse_args()
    from neurocbir.evaluate.run import evaluate_run
    from neurocbir.models.runs import trial_seeds
    from neurocbir.retrieval.ingest import index_run

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    for run in args.runs:
        if not trial_seeds(run, needs="embeddings.npz"):
            index_run(run)  # a checkpoint trained elsewhere: its embeddings of the bundled data first
        cfg = json.loads((run / "config.json").read_text())
        result = evaluate_run(run, plots=False)
        r, n = result["retrieval"], result["trials"]
        for kind, shown in (("slices", "every slice"), ("one_per_patient", "one slice per patient")):
            ens, mean = r["ensemble"][kind], r["trials_mean"][kind]
            cells = [
                f"{ens[m]:.3f}" if n == 1 else f"{ens[m]:.3f} ({mean[m]:.3f})"
                for m in ("map", "precision_at_1", "precision_at_5", "precision_at_10")
            ]
            rows.append(f"| {describe(run, cfg)} | {result['fold']} | {n} | {shown} | " + " | ".join(cells) + " |")
    body = [
        "## Retrieval: mAP and precision at k (issue 32)",
        "",
        f"Command: `python benchmarks/retrieval_results.py {' '.join(map(str, args.runs))}` | machine: {machine()} | {started}",
        "",
        "Relevant = the archive case has the query's tumor type. mAP averages, over the test-fold queries, "
        "the precision at each relevant case's rank in the ranking of the whole archive (the training "
        "folds; test patients are never in it). 'One slice per patient' ranks the archive's patients "
        "by their closest slice. With several trials: the ensemble ranks by the trials' summed squared "
        "distances (their concatenated embeddings), the mean of the trials in brackets. The test fold "
        "is read once per run, to report.",
        "",
        "| run | test fold | trials | ranking | mAP | P@1 | P@5 | P@10 |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Published on the same dataset (patient-wise five-fold cross-validation, every slice ranked; "
        "their figure is the mean over the five test folds, ours above is one test fold):",
        "",
        "| method | protocol | mAP |",
        "|---|---|---|",
        *[f"| {name} | {protocol} | {m} |" for name, protocol, m in PUBLISHED],
    ]
    write_section("retrieval", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
