"""What every command shares: one-line errors (exit code 2) instead of tracebacks, reading a
scan file, and finding the run to serve."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _guard(fn, *args, **kwargs):
    """Run ``fn``, turning the errors a user can act on (:class:`neurocbir.errors.NeurocbirError`, a
    missing file) into a one-line message and exit code 2; a bug keeps its traceback."""
    from neurocbir.errors import NeurocbirError

    try:
        return fn(*args, **kwargs)
    except (NeurocbirError, FileNotFoundError) as exc:
        _fail(str(exc))


def _explainer(llm: bool, mode: str):
    from neurocbir.errors import NeurocbirError
    from neurocbir.reports.explain import Explainer
    from neurocbir.reports.llm import llm_from_env

    backend = None
    if llm:
        try:
            backend = llm_from_env()
        except NeurocbirError as exc:  # none configured, or one off this machine not allowed
            _fail(str(exc))
    try:
        return Explainer(backend, mode=mode)
    except NeurocbirError as exc:
        _fail(str(exc))


def _explain(llm: bool, mode: str, method: str, *args):
    """Call Explainer.summarize / .answer, turning unreadable reports into a clear error."""
    from neurocbir.errors import NeurocbirError

    try:
        return getattr(_explainer(llm, mode), method)(*args)
    except NeurocbirError as exc:
        _fail(str(exc))


def _read_image_file(path: Path):
    """(pixels, pixel spacing in mm or None) of a scan file, or a clear error."""
    from neurocbir.data.uploads import UploadError, read_scan_with_spacing

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
    from neurocbir.retrieval.dicomweb import read_instance

    return _guard(read_instance, dicomweb, instance)


def _service(run: Optional[Path], archive: Optional[Path] = None):
    from neurocbir.serving.service import RetrievalService

    run = resolve_run(run)
    if archive is not None:
        return _guard(RetrievalService.from_archive, run, archive)
    return _guard(RetrievalService.from_run, run)


def _index_bundled_model() -> None:
    """First use of the committed model: index the bundled data's training folds with it."""
    from neurocbir.models.runs import BUNDLED_MODEL, trial_seeds
    from neurocbir.retrieval.ingest import index_run

    if trial_seeds(BUNDLED_MODEL, needs="checkpoint.pt") and not trial_seeds(BUNDLED_MODEL):
        typer.echo(f"First start: indexing the bundled data with the committed model {BUNDLED_MODEL} (about 2 min)...")

        def show(done: int, total: int) -> None:
            if done == total or done % 512 == 0:
                typer.echo(f"  {done}/{total} slices")

        _guard(index_run, BUNDLED_MODEL, None, None, 32, show)


def resolve_run(run: Optional[Path]) -> Path:
    """The run a command serves: the one given (the committed model is indexed on first use, as
    when it is found by default), else the best available one."""
    from neurocbir.models.runs import BUNDLED_MODEL

    if run is None:
        return default_run()
    if run.resolve() == BUNDLED_MODEL.resolve():
        _index_bundled_model()
    return run


def default_run() -> Path:
    """The best available run (see ``neurocbir.models.runs.DEFAULT_RUNS``)."""
    from neurocbir.models.runs import find_default_run

    _index_bundled_model()
    run = find_default_run()
    if run is None:
        _fail(
            "no trained run found: train one with `neurocbir train --out runs/demo` (or `make demo`), "
            "or pass --run RUN_DIR"
        )
    return run
