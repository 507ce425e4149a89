"""Command-line interface: ``neurocbir COMMAND`` (``neurocbir --help`` lists them).

Data and training: ``info``, ``train``, ``search`` (hyper-parameters by inner CV), ``evaluate``.
Archive: ``add``, ``remove``. Queries and the app: ``query``, ``ask``, ``serve``, ``demo``.
Reports: ``summarize``, ``answer``, ``write-reports``, ``eval-reports``.
Each command imports what it needs when it runs, so ``--help`` stays fast."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="neurocbir: retrieval-based brain tumor MRI decision support (not a diagnosis).",
)


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _guard(fn, *args, **kwargs):
    """Run ``fn``, turning expected user errors into a one-line message and exit code 2."""
    from .encoders import EncoderWeightsError

    try:
        return fn(*args, **kwargs)
    except (EncoderWeightsError, FileNotFoundError, ValueError, NotImplementedError) as exc:  # DatasetError,
        _fail(str(exc))  # ArchiveError, IndexMismatchError, ReportParseError... are ValueErrors


@app.command()
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
    out: Path = typer.Option(..., help="run directory to write"),
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
    cache_dir: Optional[Path] = typer.Option(None, envvar="NEUROCBIR_CACHE", help="feature cache folder"),
) -> None:
    """Train an encoder with one loss over several seeds and index the archive."""
    from .runs import LESION_CPU_DEFAULTS, LESION_DEFAULTS, TrainConfig
    from .training import train_run

    cfg = TrainConfig(
        recipe=recipe,
        loss=loss,
        fold=fold,
        first_seed=first_seed,
        weights=str(weights) if weights else None,
        random_init=random_init,
        trainable_blocks=trainable_blocks,
        data=str(data) if data else None,
        cache_dir=str(cache_dir) if cache_dir else None,
    )
    if recipe == "lesion":  # its own defaults (the loss stays as given: validate() insists on SupCon)
        from .encoders import pick_device

        preset = LESION_DEFAULTS if pick_device().type == "cuda" else LESION_CPU_DEFAULTS
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
        frozen_stages=frozen_stages,
        decoder_stride=decoder_stride,
    )
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    if frozen_stages is not None:  # a count given replaces the preset's "up to stride 8"
        cfg.frozen_stride = 0
    if recipe == "lesion":
        from .data import load_cases
        from .finetune import train_lesion_run

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


@app.command()
def index(
    run: Path = typer.Argument(..., help="run directory whose trial has a checkpoint (trained here or elsewhere)"),
    trial: Optional[int] = typer.Option(None, help="seed of the trial (default: the first)"),
    data: Optional[Path] = typer.Option(None, envvar="NEUROCBIR_DATA", help="dataset folder"),
) -> None:
    """(Re)build a trial's archive index and embeddings from the dataset with its checkpoint:
    for a run trained on another machine (a GPU) before serving or evaluating it here."""
    from .ingest import index_run

    tdir = _guard(index_run, run, data, trial)
    typer.echo(f"indexed {tdir}")


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="run directory written by `neurocbir train`"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the metrics JSON here"),
    one_per_patient: bool = typer.Option(False, help="keep one slice per archive patient among retrievals"),
    plots: bool = typer.Option(True, help="write latent_space.png and knn_overfit.png"),
) -> None:
    """AUROC and Cohen's kappa (per trial and ensemble), structure metrics, KNN overfit."""
    from .evaluate import evaluate_run

    if not (run / "config.json").is_file():
        _fail(f"{run} is not a run directory (no config.json): run `neurocbir train --out {run}` first")
    result = _guard(evaluate_run, run, one_per_patient=one_per_patient, plots=plots)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2))
    typer.echo((run / "metrics.md").read_text())


@app.command()
def calibrate(
    run: Path = typer.Argument(..., help="run directory written by `neurocbir train`"),
    data: Optional[Path] = typer.Option(None, envvar="NEUROCBIR_DATA"),
) -> None:
    """Fit the run's calibrated probabilities and prediction sets again (inner CV on the
    training patients; for runs trained before calibration existed; a CPU lesion run: its held-out
    training patients), and a lesion run's tumor outline level. The trials stay as they are."""
    from .data import load_cases
    from .training import calibrate_existing_run

    if not (run / "config.json").is_file():
        _fail(f"{run} is not a run directory (no config.json)")
    try:
        cfg = json.loads((run / "config.json").read_text())
    except ValueError:
        _fail(f"{run / 'config.json'} is corrupt (not JSON): train the run again")
    if cfg.get("recipe") == "lesion" and not cfg.get("holdout_patients"):
        typer.echo("this run holds no training patients out: refitting by inner CV trains the network 3 more times")
    seconds = _guard(calibrate_existing_run, run, _guard(load_cases, data) if data else None)
    typer.echo(f"calibrated {run} in {seconds:.0f} s: {run / 'calibration.json'}")


@app.command()
def search(
    loss: str = typer.Option("supcon"),
    fold: int = typer.Option(5),
    out: Path = typer.Option(...),
    grid: Optional[str] = typer.Option(None, help='JSON grid, e.g. \'{"lr": [1e-3, 3e-4], "epochs": [10, 30]}\''),
    data: Optional[Path] = typer.Option(None, envvar="NEUROCBIR_DATA"),
    cache_dir: Optional[Path] = typer.Option(None, envvar="NEUROCBIR_CACHE"),
) -> None:
    """Hyper-parameter search by 3-fold patient-grouped CV inside the training folds."""
    from .runs import TrainConfig
    from .tuning import default_grid, grid_search

    cfg = TrainConfig(
        loss=loss, fold=fold, data=str(data) if data else None, cache_dir=str(cache_dir) if cache_dir else None
    )
    g = json.loads(grid) if grid else default_grid(loss)
    result = _guard(grid_search, cfg, g, out)
    typer.echo(json.dumps(result["best"], indent=2))


@app.command()
def info(data: Optional[Path] = typer.Option(None, envvar="NEUROCBIR_DATA")) -> None:
    """Describe the dataset: cases, patients, folds (no patient ids are printed)."""
    from .data import CLASS_NAMES, load_cases

    t = _guard(load_cases, data)
    typer.echo(f"{len(t)} cases, {len(set(t.patient_id.tolist()))} patients")
    for c, n in enumerate(CLASS_NAMES):
        typer.echo(f"  {n}: {(t.label == c).sum()}")
    for f in sorted(set(t.fold.tolist())):
        sel = t.fold == f
        typer.echo(f"  fold {f}: {sel.sum()} cases, {len(set(t.patient_id[sel].tolist()))} patients")


def _explainer(llm: bool, mode: str):
    from .explain import Explainer
    from .llm import LLMUnavailable, llm_from_env

    backend = None
    if llm:
        try:
            backend = llm_from_env()
        except LLMUnavailable as exc:
            _fail(str(exc))
    try:
        return Explainer(backend, mode=mode)
    except ValueError as exc:
        _fail(str(exc))


def _explain(llm: bool, mode: str, method: str, *args):
    """Call Explainer.summarize / .answer, turning unreadable reports into a clear error."""
    from .reports import ReportParseError

    try:
        return getattr(_explainer(llm, mode), method)(*args)
    except (ReportParseError, ValueError) as exc:
        _fail(str(exc))


@app.command()
def summarize(
    report: list[str] = typer.Option(..., "--report", help="a retrieved report (repeat, in retrieval order)"),
    query_report: Optional[str] = typer.Option(None, help="the query scan's report"),
    as_json: bool = typer.Option(False, "--json"),
    llm: bool = typer.Option(False, help="phrase with the configured LLM"),
    mode: str = typer.Option("grounded", help="grounded | paper (LLM only)"),
) -> None:
    """Summarise retrieved reports: modality, technique, tumor types, sizes, planes."""
    out = _explain(llm, mode, "summarize", report, query_report)
    typer.echo(json.dumps({"summary": out["summary"], "facts": out["facts"]}, indent=2) if as_json else out["summary"])


@app.command()
def answer(
    question: str = typer.Option(..., help="a question about the retrieved reports"),
    report: list[str] = typer.Option(..., "--report", help="a retrieved report (repeat, in retrieval order)"),
    query_report: Optional[str] = typer.Option(None, help="the query scan's report"),
    as_json: bool = typer.Option(False, "--json"),
    llm: bool = typer.Option(False, help="phrase with the configured LLM"),
    mode: str = typer.Option("grounded", help="grounded | paper (LLM only)"),
) -> None:
    """Answer a question about retrieved reports (grounded: numbers computed, never guessed)."""
    ans, _ = _explain(llm, mode, "answer", question, report, query_report)
    typer.echo(json.dumps(ans.as_dict(), indent=2) if as_json else ans.answer)


@app.command("eval-reports")
def eval_reports(
    run: Optional[Path] = typer.Option(None, help="take query sets from this trained run's index"),
    n_sets: int = typer.Option(50),
    llm: bool = typer.Option(False),
    mode: str = typer.Option("grounded"),
    json_out: Optional[Path] = typer.Option(None, "--json"),
    data: Optional[Path] = typer.Option(None, envvar="NEUROCBIR_DATA"),
) -> None:
    """The paper's Fig. 4: summary accuracy / completeness and Q&A accuracy per report style."""
    from .data import load_cases
    from .report_eval import evaluate_reports, query_sets

    table = _guard(load_cases, data)
    result = _guard(evaluate_reports, table, query_sets(table, n_sets, run=run), _explainer(llm, mode))
    doc = {"mode": mode if llm else "grounded", "backend": "llm" if llm else "none", "styles": result}
    if json_out:
        json_out.write_text(json.dumps(doc, indent=2))
    typer.echo(json.dumps(doc, indent=2))


def _read_image_file(path: Path):
    """(pixels, pixel spacing in mm or None) of a scan file, or a clear error."""
    from .uploads import UploadError, read_scan_with_spacing

    if not path.is_file():
        _fail(f"no such file: {path}")
    try:
        return read_scan_with_spacing(path.read_bytes(), path.name)
    except UploadError as exc:
        _fail(f"{path}: {exc}")


def _read_query_scan(image: Optional[Path], dicomweb: Optional[str], instance: Optional[str]):
    """The query scan from a file, or from a PACS by SOP Instance UID."""
    if (image is None) == (instance is None):
        _fail("give a scan file, or --dicomweb URL --instance UID (not both)")
    if image is not None:
        return _read_image_file(image)
    if dicomweb is None:
        _fail("--instance needs --dicomweb URL (the PACS's DICOMweb root)")
    from .dicomweb import read_instance

    return _guard(read_instance, dicomweb, instance)


def _service(run: Optional[Path], archive: Optional[Path] = None):
    from .service import RetrievalService

    run = resolve_run(run)
    if archive is not None:
        return _guard(RetrievalService.from_archive, run, archive)
    return _guard(RetrievalService.from_run, run)


def _index_bundled_model() -> None:
    """First use of the committed model: index the bundled data's training folds with it."""
    from .ingest import index_run
    from .runs import BUNDLED_MODEL, trial_seeds

    if trial_seeds(BUNDLED_MODEL, needs="checkpoint.pt") and not trial_seeds(BUNDLED_MODEL):
        typer.echo(f"First start: indexing the bundled data with the committed model {BUNDLED_MODEL} (about 2 min)...")

        def show(done: int, total: int) -> None:
            if done == total or done % 512 == 0:
                typer.echo(f"  {done}/{total} slices")

        _guard(index_run, BUNDLED_MODEL, None, None, 32, show)


def resolve_run(run: Optional[Path]) -> Path:
    """The run a command serves: the one given (the committed model is indexed on first use, as
    when it is found by default), else the best available one."""
    from .runs import BUNDLED_MODEL

    if run is None:
        return default_run()
    if run.resolve() == BUNDLED_MODEL.resolve():
        _index_bundled_model()
    return run


def default_run() -> Path:
    """The best available run (see ``neurocbir.runs.DEFAULT_RUNS``)."""
    from .runs import find_default_run

    _index_bundled_model()
    run = find_default_run()
    if run is None:
        _fail(
            "no trained run found: train one with `neurocbir train --out runs/demo` (or `make demo`), "
            "or pass --run RUN_DIR"
        )
    return run


@app.command()
def query(
    image: Optional[Path] = typer.Argument(None, help="PNG/JPEG, DICOM or figshare .mat file (or use --instance)"),
    run: Optional[Path] = typer.Option(None, help="trained run directory"),
    k: int = typer.Option(5),
    one_per_patient: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json"),
    archive: Optional[Path] = typer.Option(None, help="case archive built by `neurocbir add` (default: the run's own)"),
    coverage: float = typer.Option(0.95, min=0.5, max=0.999, help="coverage of the prediction set"),
    plane: Optional[str] = typer.Option(None, help="show only archive cases in this plane"),
    tumor_type: Optional[str] = typer.Option(None, help="show only archive cases of this tumor type"),
    min_area: Optional[float] = typer.Option(None, help="show only tumors of at least this many mm²"),
    max_area: Optional[float] = typer.Option(None, help="show only tumors of at most this many mm²"),
    dicomweb: Optional[str] = typer.Option(None, help="DICOMweb server (PACS) to fetch --instance from"),
    instance: Optional[str] = typer.Option(None, help="SOP Instance UID of the scan on the --dicomweb server"),
) -> None:
    """Predict the tumor type of a scan (a file, or an instance on a PACS) from its most similar
    archive cases."""
    from .sources import CaseFilter

    filters = _guard(CaseFilter, plane, tumor_type, min_area, max_area)
    img, spacing = _read_query_scan(image, dicomweb, instance)
    svc = _service(run, archive)
    out = _guard(
        svc.query,
        img,
        k=k,
        one_per_patient=one_per_patient,
        coverage=coverage,
        pixel_spacing_mm=spacing,
        filters=filters,
    )
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    if out["no_similar_case"]:  # a calibrated probability would not hold for this scan
        shown = "confidence withheld: no similar archive case"
    else:
        kind = "calibrated confidence" if out["calibrated"] else "uncalibrated softmax(I_c)"
        shown = f"{kind} {out['confidence']:.1%}"
    typer.echo(
        f"{out['prediction']} ({shown}; KNN-7 vote "
        + ", ".join(f"{c} {p:.0%}" for c, p in out["knn_vote"].items())
        + ")"
    )
    if out["prediction_set"] is not None:
        typer.echo(f"{out['coverage']:.0%} prediction set: {' or '.join(out['prediction_set'])}")
    if out["neighbours_disagree"]:
        typer.echo("the neighbours disagree: read the evidence below")
    if out["no_similar_case"]:
        typer.secho("warning: no similar case found; the prediction is unreliable", fg=typer.colors.RED)
    if out.get("query_tumor"):
        t = out["query_tumor"]
        typer.echo(f"query tumor: about {t['area_mm2']:.0f} mm² ({t['note']})")
    if out.get("nearest_other_class"):
        o = out["nearest_other_class"]
        typer.echo(
            f"nearest case of another class: case {o['case_id']}, {o['label']}, distance {o['distance']:.3f} (rank {o['rank']})"
        )
    if out.get("filters"):
        shown = ", ".join(f"{k}={v}" for k, v in out["filters"].items() if v is not None)
        typer.echo(f"retrievals filtered ({shown}); the prediction reads the whole archive")
    for i, r in enumerate(out["retrievals"], 1):
        size = "size unknown" if r["area_mm2"] is None else f"{r['area_mm2']:.1f} mm²"
        typer.echo(
            f"  {i}. case {r['case_id']}: {r['label']}, {r['plane'] or 'plane unknown'}, {size}, distance {r['distance']:.3f}"
        )
    typer.echo(out["disclaimer"])


@app.command()
def ask(
    image: Path = typer.Argument(...),
    question: str = typer.Argument(...),
    run: Optional[Path] = typer.Option(None),
    k: int = typer.Option(5),
    style: str = typer.Option("normal"),
    llm: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Ask a question about the reports of a scan's most similar archive cases."""
    img, spacing = _read_image_file(image)
    svc = _service(run)
    out = _guard(svc.query, img, k=k, pixel_spacing_mm=spacing)
    if out["no_similar_case"]:  # on stderr, so that --json stays one document
        typer.secho("warning: no similar case found; these reports are of dissimilar scans", fg="red", err=True)
    reports = _guard(svc.cases.reports, [r["case_id"] for r in out["retrievals"]], style)
    area = out["query_tumor"]["area_mm2"] if out.get("query_tumor") else None
    ans, _ = _explain(llm, "grounded", "answer", question, reports, None, area)
    typer.echo(json.dumps(ans.as_dict(), indent=2) if as_json else ans.answer)


@app.command()
def serve(
    run: Optional[Path] = typer.Option(None),
    port: int = typer.Option(8000),
    host: str = typer.Option("127.0.0.1", help="bind address (loopback by default)"),
    archive: Optional[Path] = typer.Option(None, help="case archive built by `neurocbir add` (default: the run's own)"),
    dicomweb: Optional[str] = typer.Option(
        None, help="DICOMweb server (PACS) whose instances can be queried by SOP Instance UID"
    ),
) -> None:
    """Serve the web UI and the HTTP API."""
    from .app import serve as _serve

    _guard(_serve, resolve_run(run), host, port, archive, dicomweb)


@app.command()
def add(
    folder: Optional[Path] = typer.Argument(
        None, help="bundled dataset folder, figshare .mat folder, or scans + cases.csv (or use --dicomweb)"
    ),
    archive: Path = typer.Option(Path("archive"), help="archive folder (created if missing)"),
    run: Optional[Path] = typer.Option(None, help="trained run whose encoder embeds the scans"),
    store: str = typer.Option("flat", help="vector store: flat (exact FAISS), hnsw (approximate FAISS) or milvus"),
    milvus_uri: Optional[str] = typer.Option(
        None, help="Milvus server (http://host:19530) or Milvus Lite .db file; token from $NEUROCBIR_MILVUS_TOKEN"
    ),
    milvus_index: str = typer.Option(
        "FLAT", help="index type of a new Milvus collection (FLAT exact; IVF_FLAT, HNSW... on a Milvus server)"
    ),
    fold: Optional[list[int]] = typer.Option(None, help="only these folds of a dataset folder (repeatable)"),
    batch_size: int = typer.Option(32, min=1, max=1024),
    index_every: float = typer.Option(
        30.0, min=0, help="write the vector index at most every N seconds (and at the end)"
    ),
    dicomweb: Optional[str] = typer.Option(
        None, help="ingest from this DICOMweb server (PACS), e.g. http://pacs:8042/dicom-web, instead of a folder"
    ),
    labels: Optional[Path] = typer.Option(
        None, help="with --dicomweb: CSV sop_instance_uid,label[,patient_id,plane,area_mm2,report]"
    ),
    study: Optional[str] = typer.Option(None, help="with --dicomweb: only this Study Instance UID"),
) -> None:
    """Embed the scans of FOLDER (or of a PACS, with --dicomweb) and add them to a case archive;
    safe to kill and rerun (resumes, never duplicates). Patient names and ids are not stored."""
    from tqdm import tqdm

    from .ingest import ingest

    bar = None

    def show(done: int, total: int) -> None:
        nonlocal bar
        bar = bar or tqdm(total=total, desc="adding cases", unit="scan")
        bar.update(done - bar.n)

    try:
        out = _guard(
            ingest,
            folder,
            archive,
            resolve_run(run),
            store,
            milvus_uri,
            milvus_index,
            fold,
            batch_size,
            index_every,
            show,
            dicomweb,
            labels,
            study,
        )
    finally:
        if bar is not None:
            bar.close()
    typer.echo(
        f"{out['added']} cases added, {out['already_there']} already there; the archive at {archive} holds "
        f"{out['total']} cases ({out['check']['store_count']} in its {out['store']} index)"
    )
    if out["unlabelled"]:
        typer.secho(
            f"  {out['unlabelled']} instances on the server are not in {labels}: not added", fg=typer.colors.YELLOW
        )
    for e in out["errors"][:20]:
        typer.secho(f"  skipped {e}", fg=typer.colors.YELLOW)
    if len(out["errors"]) > 20:
        typer.secho(f"  ... and {len(out['errors']) - 20} more unreadable files", fg=typer.colors.YELLOW)


@app.command()
def remove(
    case_ids: list[int] = typer.Argument(..., help="archive case ids (as `query` and the app show them)"),
    archive: Path = typer.Option(Path("archive"), help="archive folder"),
) -> None:
    """Remove cases from a case archive (a withdrawn or mislabelled scan); crash-safe like `add`."""
    from .archive import remove_cases

    removed, left = _guard(remove_cases, archive, case_ids)
    missing = sorted(set(case_ids) - set(removed))
    typer.echo(f"{len(removed)} case(s) removed; the archive at {archive} holds {left} cases")
    if missing:
        typer.secho(f"  not in the archive: {', '.join(map(str, missing))}", fg=typer.colors.YELLOW)


@app.command()
def demo(port: int = typer.Option(8000)) -> None:
    """The main job: serve the committed model (indexed on first start), else the best trained
    run, else train a quick one (~5 min) first."""
    from .app import serve as _serve
    from .runs import TrainConfig, find_default_run
    from .training import train_run

    _index_bundled_model()
    run = find_default_run()
    if run is None:
        run = Path("runs/demo")
        typer.echo(
            "No trained run yet: training a quick SupCon model (head only, no augmented copies, 1 trial). "
            "For the lesion model run `neurocbir train --out runs/mine` (about 25 min on 2 cores)."
        )
        cfg = TrainConfig(loss="supcon", trials=1, trainable_blocks=0, n_copies=0, epochs=20)
        _guard(train_run, cfg, run)
    _guard(_serve, run, "127.0.0.1", port)


@app.command("write-reports")
def write_reports(
    limit: Optional[int] = typer.Option(None, help="only the first N cases (each is one LLM call)"),
    data: Optional[Path] = typer.Option(None, envvar="NEUROCBIR_DATA"),
) -> None:
    """Have the configured LLM write the normal-style reports (checked, cached, resumable)."""
    from tqdm import tqdm

    from .data import load_cases
    from .llm import LLMUnavailable, llm_from_env
    from .reports import llm_normal_reports, llm_reports_path

    try:
        llm = llm_from_env()
    except LLMUnavailable as exc:
        _fail(str(exc))
    table = _guard(load_cases, data)
    rows = [r for r in range(len(table) if limit is None else min(limit, len(table))) if table.plane[r]]
    path = llm_reports_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    out = llm_normal_reports(table, llm, path, rows=tqdm(rows, desc="LLM reports", unit="case"))
    typer.echo(f"{len(out)} normal reports cached in {path}")


def main() -> None:  # pragma: no cover
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
