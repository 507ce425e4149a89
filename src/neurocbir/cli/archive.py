"""The case archive: ``add`` (folders or a PACS) and ``remove``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from neurocbir.cli._common import _guard, resolve_run


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
    milvus_wait: float = typer.Option(
        60.0, min=0, help="wait up to this many seconds for a Milvus server that is not ready yet"
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
    part: Optional[str] = typer.Option(
        None, help="of a folder of other hospitals' slices: only its development or validation part (group-wise)"
    ),
    examples: bool = typer.Option(
        False, "--examples", help="store the scans as held-out examples to try the app with (never searched)"
    ),
    keep_duplicates: bool = typer.Option(
        False,
        "--keep-duplicates",
        help="add scans that the archive already holds in another file (re-encoded, resized, cropped a little or "
        "mirrored) all the same; by default each is reported with the case it duplicates and not added",
    ),
    json_out: bool = typer.Option(False, "--json", help="end with a JSON summary on standard output"),
) -> None:
    """Embed the scans of FOLDER (or of a PACS, with --dicomweb) and add them to a case archive;
    safe to kill and rerun (resumes, never duplicates). Patient names and ids are not stored."""
    from tqdm import tqdm

    from neurocbir.retrieval.ingest import ingest

    bar = None

    def show(done: int, total: int) -> None:
        nonlocal bar
        bar = bar or tqdm(total=total, desc="adding cases", unit="scan", disable=json_out)
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
            part,
            examples,
            keep_duplicates,
            milvus_wait,
        )
    finally:
        if bar is not None:
            bar.close()
    kind = "examples" if out.get("examples") else "cases"
    say = (lambda text, **_: typer.echo(text, err=True)) if json_out else typer.secho
    say(
        f"{out['added']} {kind} added, {out['already_there']} already there; the archive at {archive} holds "
        f"{out['total']} cases ({out['check']['store_count']} in its {out['store']} index)"
    )
    dups = out["duplicates"]
    for d in dups[:20]:
        how = "a mirror image of" if d["mirrored"] else "the same image as"
        say(f"  {d['file']} is {how} case {d['case_id']}: {'added all the same' if d['kept'] else 'not added'}")
    if len(dups) > 20:
        say(f"  ... and {len(dups) - 20} more duplicates")
    if dups and not keep_duplicates:
        say(f"  {len(dups)} duplicate(s) not added (--keep-duplicates adds them)", fg=typer.colors.YELLOW)
    if out["unlabelled"]:
        say(f"  {out['unlabelled']} instances on the server are not in {labels}: not added", fg=typer.colors.YELLOW)
    for e in out["errors"][:20]:
        say(f"  skipped {e}", fg=typer.colors.YELLOW)
    if len(out["errors"]) > 20:
        say(f"  ... and {len(out['errors']) - 20} more unreadable files", fg=typer.colors.YELLOW)
    if json_out:
        summary = {k: out[k] for k in ("added", "already_there", "duplicates", "errors", "total", "unlabelled")}
        typer.echo(json.dumps({**summary, "examples": bool(out.get("examples")), "store": out["store"]}))


def remove(
    case_ids: list[int] = typer.Argument(..., help="archive case ids (as `query` and the app show them)"),
    archive: Path = typer.Option(Path("archive"), help="archive folder"),
) -> None:
    """Remove cases from a case archive (a withdrawn or mislabelled scan); crash-safe like `add`."""
    from neurocbir.retrieval.ingest import remove_cases

    removed, left = _guard(remove_cases, archive, case_ids)
    missing = sorted(set(case_ids) - set(removed))
    typer.echo(f"{len(removed)} case(s) removed; the archive at {archive} holds {left} cases")
    if missing:
        typer.secho(f"  not in the archive: {', '.join(map(str, missing))}", fg=typer.colors.YELLOW)
