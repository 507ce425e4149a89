"""The lesion recipe on this CPU (issue 9): which setting becomes `neurocbir train`'s default,
chosen on training patients only, then read on the test fold once.

Each candidate is the lesion recipe's CPU preset (``neurocbir.runs.LESION_CPU_DEFAULTS``: the
trunk stages up to stride 8 pretrained and frozen, bf16 autocast, batch 32, one trial,
calibration on 1/7 of the training patients held out of training) with one backbone and
resolution, and as many epochs as fit about 20 minutes of training on 2 cores at the speed
measured before any run (no score involved). The candidate with the best NIR kappa on the
held-out training patients is the default; only its test-fold figures are read and shown.
A candidate with its backbone and resolution and the stride-2 tumor decoder (``:s2``, epochs cut
to fit the budget) replaces it when its held-out median area error is lower and its held-out NIR
kappa at most 0.01 lower (one trial's noise): the decoder stride is a choice about the outline
(rule set before the stride-2 runs were trained).

    .venv/bin/python benchmarks/cpu_recipe.py                     # trains what is missing (~25 min each)
    .venv/bin/python benchmarks/cpu_recipe.py --configs efficientnet_lite2@224:10:8

Run it with nothing else on the machine: the wall time is part of the result.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lesion_results import app_path
from results_doc import machine, write_section

ROOT = Path(__file__).resolve().parents[1]
#: encoder@px:epochs:frozen stages (the stages up to stride 8 of each backbone)
CANDIDATES = (
    "efficientnet_lite2@224:10:8",
    "efficientnet_lite2@192:14:8",
    "efficientnet_lite2@256:7:8",
    "mobilenetv2@224:25:7",
    "efficientnet_lite2@288:6:8",  # added after the first four: Lite2 rose with resolution
    "mobilenetv2@224:25:7:s2",  # the chosen one with a stride-2 tumor decoder (area error, issue 9)
    "mobilenetv2@224:21:7:s2",  # the same in the budget: 25 epochs took 32 min, 21 fit at its epoch time
)
KAPPA_TOLERANCE = 0.01  # how much held-out kappa a finer decoder may cost (one trial's noise)


BUDGET_MIN = 30  # the default recipe trains in <= 30 min on 2 cores, everything included (issue 9)


def parse(spec: str) -> tuple[str, int, int, int, int]:
    """encoder@px:epochs:frozen[:s<decoder stride>] -> (encoder, px, epochs, frozen, decoder stride)."""
    encoder, rest = spec.split("@")
    size, epochs, frozen, *stride = rest.split(":")
    return encoder, int(size), int(epochs), int(frozen), int(stride[0].removeprefix("s")) if stride else 4


def run_name(spec: str, fold: int) -> str:
    encoder, size, epochs, _, stride = parse(spec)
    return f"lesion-fold{fold}-{encoder}-{size}px-{epochs}ep" + (f"-s{stride}" if stride != 4 else "")


def train(run: Path, spec: str, fold: int) -> None:
    encoder, size, epochs, frozen, stride = parse(spec)
    cmd = [sys.executable, "-m", "neurocbir.cli", "train", "--recipe", "lesion", "--fold", str(fold)]
    cmd += ["--encoder", encoder, "--image-size", str(size), "--epochs", str(epochs)]
    cmd += ["--frozen-stages", str(frozen), "--decoder-stride", str(stride), "--out", str(run)]
    t0 = time.time()
    subprocess.run(cmd, check=True)
    (run / "wall.json").write_text(json.dumps({"wall_s": round(time.time() - t0, 1), "machine": machine()}))


def minutes(run: Path) -> float:
    """`neurocbir train` start to end; runs trained before wall.json existed: their timings."""
    if (run / "wall.json").is_file():
        return json.loads((run / "wall.json").read_text())["wall_s"] / 60
    t = json.loads((run / "timings.json").read_text())
    return (t.get("total_s") or t["load_s"] + sum(t["trials_s"]) + t.get("calibration_s", 0)) / 60


def nir_probas(run: Path, table) -> tuple[np.ndarray, np.ndarray]:
    """Uncalibrated NIR probabilities (softmax of I_c) of the run's first trial: its held-out
    training patients against the other training patients, and the test fold against the archive."""
    from neurocbir.classify import NIRClassifier
    from neurocbir.finetune import holdout_embeddings
    from neurocbir.runs import trial_dir

    cfg, fit_rows, _, fit, cal = holdout_embeddings(run, table)
    arrays = np.load(trial_dir(run, cfg.first_seed) / "embeddings.npz")
    return (
        NIRClassifier().fit(fit, table.label[fit_rows]).predict_proba(cal),
        NIRClassifier().fit(arrays["archive"], table.label[arrays["archive_rows"]]).predict_proba(arrays["test"]),
    )


def ensemble_row(rows: list[dict], fold: int) -> str:
    """The two best candidates on the held-out patients (a rule fixed before any score), their NIR
    probabilities averaged (the paper's E-CK across backbones): held-out and test kappa."""
    from sklearn.metrics import cohen_kappa_score, roc_auc_score

    from neurocbir.data import load_cases
    from neurocbir.finetune import holdout_split
    from neurocbir.runs import TrainConfig

    pair = sorted(rows, key=lambda r: -r["inner"]["kappa"]["nir"])[:2]
    table = load_cases(json.loads((pair[0]["run"] / "config.json").read_text()).get("data"))
    parts = [nir_probas(r["run"], table) for r in pair]
    cal_rows = holdout_split(TrainConfig(**json.loads((pair[0]["run"] / "config.json").read_text())), table)[1]
    y_cal, y_test = table.label[cal_rows], table.label[table.fold == fold]
    held = np.mean([p[0] for p in parts], axis=0)
    test = np.mean([p[1] for p in parts], axis=0)
    kappa = cohen_kappa_score(y_test, test.argmax(1))
    auroc = roc_auc_score(y_test, test, multi_class="ovr")
    names = " + ".join(
        f"{r['encoder']} {r['size']} px" + (f" stride {r['stride']}" if r["stride"] != 4 else "") for r in pair
    )
    return (
        f"| ensemble of the two best: {names} | | | | {sum(minutes(r['run']) for r in pair):.1f} "
        f"| {cohen_kappa_score(y_cal, held.argmax(1)):.3f} ({len(y_cal)}) | "
        f"| {np.mean(test.argmax(1) == y_test):.3f} / {kappa:.3f} / {auroc:.3f} (from the runs' embeddings, uncalibrated) |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--configs", nargs="+", default=list(CANDIDATES), help="encoder@px:epochs:frozen-stages[:s<decoder stride>]"
    )
    p.add_argument("--fold", type=int, default=5)
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "cpu")
    p.add_argument("--train-only", action="store_true", help="train the missing candidates, read nothing")
    args = p.parse_args()
    rows = []
    for spec in args.configs:
        encoder, size, epochs, frozen, stride = parse(spec)
        run = args.runs / run_name(spec, args.fold)
        if not (run / "calibration.json").is_file():
            train(run, spec, args.fold)
        inner = json.loads((run / "calibration.json").read_text())["inner_cv"]
        level = run / "tumor_level.json"
        area = min(json.loads(level.read_text())["held_out_median_area_error"].values()) if level.is_file() else None
        rows.append(
            dict(spec=spec, encoder=encoder, size=size, epochs=epochs, stride=stride, run=run, inner=inner, area=area)
        )
    if args.train_only:
        return
    eligible = [r for r in rows if minutes(r["run"]) <= BUDGET_MIN] or rows  # the default must fit the budget
    best = max(eligible, key=lambda r: r["inner"]["kappa"]["nir"])  # training patients only
    finer = [  # the same candidate with another decoder stride: the outline decides (module docstring)
        r
        for r in eligible
        if (r["encoder"], r["size"]) == (best["encoder"], best["size"])
        and r["stride"] != best["stride"]
        and r["inner"]["kappa"]["nir"] >= best["inner"]["kappa"]["nir"] - KAPPA_TOLERANCE
        and None not in (r["area"], best["area"])
        and r["area"] < best["area"]
    ]
    best = min(finer, key=lambda r: r["area"]) if finer else best
    t0 = time.time()
    served_rows, served = app_path(best["run"], "fitted on the held-out training patients")  # the test fold, once
    level = (
        json.loads((best["run"] / "tumor_level.json").read_text())
        if (best["run"] / "tumor_level.json").is_file()
        else None
    )
    table = [
        "| backbone | px | epochs | tumor map stride | `neurocbir train`, everything included (min) | NIR kappa on "
        "held-out training patients (slices) | area error there (median) | test fold: NIR accuracy / kappa / AUROC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        test = (
            f"**{served['accuracy']:.3f} / {served['nir_kappa']:.3f} / {served['nir_auroc']:.3f}**"
            if r is best
            else "not read"
        )
        table.append(
            f"| {r['encoder']}{' (chosen)' if r is best else ''} | {r['size']} | {r['epochs']} | {r['stride']} "
            f"| {minutes(r['run']):.1f} | {r['inner']['kappa']['nir']:.3f} ({r['inner']['n']}) "
            f"| {'' if r['area'] is None else format(100 * r['area'], '.0f') + ' %'} | {test} |"
        )
    if len(rows) > 2:
        table.append(ensemble_row(rows, args.fold))
    cal = json.loads((best["run"] / "calibration.json").read_text())["how"]
    body = [
        "## Lesion recipe on the CPU: the default `neurocbir train` (issue 9)",
        "",
        f"Command: `python benchmarks/cpu_recipe.py {' '.join(sys.argv[1:])}` | machine: {machine()} | "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | test fold {args.fold} | evaluation {time.time() - t0:.0f} s",
        "",
        "The lesion recipe (SupCon + tumor decoder, fresh random augmentation every step) sized for 2 cores: "
        "the trunk stages up to stride 8 stay pretrained and frozen, bf16 autocast, batch 32, one trial (seed 0). "
        "Candidates differ in backbone and resolution, each with the epochs that fit about 20 minutes of training "
        "at the speed measured on synthetic batches before any run (MobileNetV2's real epochs came out 1.3x slower "
        "than that measure, so it trained about 25 minutes). Lite2 at 288 px was added after the first four "
        "had been compared, because Lite2's held-out kappa rose with resolution; by then the first choice's test "
        f"figures had been read, and the added candidate is judged by the same held-out rule. Choice: among the candidates that took at most {BUDGET_MIN} minutes, the best NIR kappa on training patients held out of "
        f"training ({cal}); a candidate with its backbone and resolution and the stride-2 tumor decoder (added "
        "for the area error after the other five had been read; the 25-epoch one took longer than the budget, so "
        "a 21-epoch one, the epochs that fit at its measured epoch time, was added) replaces it when its held-out "
        f"median area error is lower and its held-out kappa at most {KAPPA_TOLERANCE} lower (a rule set before "
        "either was trained). "
        "The test fold is read for the chosen candidate only, through the app's own path "
        "(OpenVINO, full-resolution slices, calibrated NIR). Time: `neurocbir train` from start to end (weights, "
        "data, training, archive index, calibration, outline level). The ensemble row is one more configuration, "
        "beyond the 30-minute budget (two trainings): the two best candidates on the held-out patients (a rule "
        "fixed beforehand), their NIR probabilities averaged, its test fold read once too.",
        "",
        *table,
        "",
        *(
            [
                f"Tumor outline level {level['level']}, chosen on the held-out training patients (median relative "
                f"area error there by level: {', '.join(f'{k}: {v:.2f}' for k, v in level['held_out_median_area_error'].items())})."
            ]
            if level
            else []
        ),
        "",
        *served_rows,
    ]
    write_section("cpu-recipe", "\n".join(body))
    print("\n".join(body))
    print(json.dumps(served))


if __name__ == "__main__":
    main()
