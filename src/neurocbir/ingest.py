"""Ingestion: folders of scans, or a PACS, into a case archive (``neurocbir add``).

A folder is the bundled dataset layout, the figshare ``.mat`` release, or any folder of
PNG/JPEG/DICOM/.mat scans with a ``cases.csv``; a PACS is a DICOMweb server with a labels CSV
(:mod:`neurocbir.dicomweb`). Cases are keyed by content hash (or SOP Instance UID hash),
embedded in batches while the next batch is read, and committed one batch at a time
(:mod:`neurocbir.archive` makes each step crash-safe), so a killed ingest resumes where it stopped.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .archive import ArchiveError, CaseArchive, CaseRecord, writer_lock
from .data import CLASS_NAMES, PLANES, DatasetError, load_cases
from .files import sha256_file

# images -> (embeddings, trunk descriptors): a model's embedding function, as `add_folder` calls it
Embedder = Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]]


@dataclass
class CaseFile:
    """A case on disk before it is embedded."""

    path: Path
    label: int
    patient_id: str
    plane: str = ""
    area_mm2: float | None = None
    source_case: int | None = None
    report: str | None = None
    load: Callable[[], np.ndarray] | None = None
    key: str | None = None  # the archive's identity of the case; default: the file's SHA-256
    name: str | None = None  # how messages name it; default: the file name

    @property
    def shown_name(self) -> str:
        return self.name or self.path.name

    def pixels(self) -> np.ndarray:
        if self.load is not None:
            return self.load()
        from .uploads import read_scan

        return read_scan(self.path.read_bytes(), self.path.name)


def parse_label(value: str, where: str) -> int:
    v = value.strip().lower()
    if v in CLASS_NAMES:
        return CLASS_NAMES.index(v)
    if v in ("1", "2", "3"):  # the figshare convention
        return int(v) - 1
    raise ArchiveError(f"{where}: label {value!r} is not one of {', '.join(CLASS_NAMES)} (or 1, 2, 3)")


def scan_folder(folder: Path | str, folds: Iterable[int] | None = None) -> list[CaseFile]:
    """The cases of a folder: the bundled dataset layout, the figshare ``.mat`` release, or
    any folder of PNG/JPEG/DICOM/.mat scans with a ``cases.csv`` (columns ``file,label`` and
    optionally ``patient_id,plane,area_mm2,report``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArchiveError(f"no such folder: {folder}")
    if (folder / "cases.csv").is_file():
        return _scan_csv(folder)
    try:
        table = load_cases(folder)
    except DatasetError as exc:
        raise ArchiveError(
            f"{exc}; or put a cases.csv (file,label[,patient_id,plane,area_mm2,report]) beside the scans"
        ) from None
    keep = np.ones(len(table), bool) if folds is None else np.isin(table.fold, list(folds))
    loader = table.loader
    files = []
    for r in np.flatnonzero(keep):
        idx = int(table.idx[r])
        files.append(
            CaseFile(
                loader.image_path(idx),
                int(table.label[r]),
                str(table.patient_id[r]),
                str(table.plane[r]),
                float(table.area_mm2[r]),
                idx,
                load=lambda i=idx: loader.load_image(i),
            )
        )
    return files


def read_rows(path: Path, required: set[str], columns: str) -> list[tuple[str, dict]]:
    """(where, row) for each line of a UTF-8 CSV that has the ``required`` columns."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = required - set(reader.fieldnames or [])
            if missing:
                raise ArchiveError(f"{path} lacks columns {sorted(missing)} (expected {columns})")
            rows = list(reader)
    except OSError as exc:
        raise ArchiveError(f"cannot read {path} ({exc.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ArchiveError(f"{path} is not a UTF-8 CSV file ({exc})") from None
    out = []
    for n, r in enumerate(rows, 2):
        where = f"{path}, line {n}"
        if any(r.get(c) is None for c in required):
            raise ArchiveError(f"{where}: fewer values than columns")
        out.append((where, r))
    return out


def row_attributes(r: dict, where: str) -> tuple[int, str, float | None, str | None]:
    """The label, plane, tumor area and report of a CSV row, checked."""
    plane = (r.get("plane") or "").strip().lower()
    if plane and plane not in PLANES:
        raise ArchiveError(f"{where}: plane {plane!r} is not one of {', '.join(PLANES)}")
    try:
        area = float(r["area_mm2"]) if (r.get("area_mm2") or "").strip() else None
    except ValueError:
        raise ArchiveError(f"{where}: area_mm2 {r['area_mm2']!r} is not a number") from None
    return parse_label(r["label"], where), plane, area, r.get("report") or None


def _scan_csv(folder: Path) -> list[CaseFile]:
    files = []
    for where, r in read_rows(folder / "cases.csv", {"file", "label"}, "file,label[,patient_id,plane,area_mm2,report]"):
        try:
            f = (folder / r["file"]).resolve()
        except (ValueError, OSError):  # e.g. a NUL in the name
            raise ArchiveError(f"{where}: {r['file']!r} is not a file name") from None
        if not f.is_relative_to(folder.resolve()) or not f.is_file():
            raise ArchiveError(f"{where}: no file {r['file']!r} in {folder}")
        label, plane, area, report = row_attributes(r, where)
        files.append(CaseFile(f, label, (r.get("patient_id") or "").strip() or f.name, plane, area, report=report))
    return files


def add_folder(
    archive: CaseArchive,
    files: list[CaseFile],
    embed: Embedder,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    index_every_s: float = 30.0,
) -> dict:
    """Embed and add the files the archive does not hold yet, one committed batch at a time
    (so a killed run resumes where it stopped). The store is written every ``index_every_s``
    seconds and at the end (saving a large index per batch would dominate); committed cases
    not yet in the store are indexed on the next open. Unreadable files are skipped and reported."""
    hashes = [f.key or sha256_file(f.path) for f in files]
    known = archive.known_hashes(hashes)
    todo = [(f, h) for f, h in zip(files, hashes) if h not in known]
    seen: set[str] = set()
    todo = [(f, h) for f, h in todo if not (h in seen or seen.add(h))]  # the same file twice in one folder
    added, skipped, errors = 0, len(files) - len(todo), []
    if progress:
        progress(skipped)

    def read(chunk: list) -> tuple[list, list]:
        batch, images = [], []
        for f, h in chunk:
            try:
                images.append(f.pixels())
                batch.append((f, h))
            except (ValueError, OSError) as exc:  # UploadError / DatasetError / PacsError are ValueErrors
                errors.append(f"{f.shown_name}: {exc}")
        return batch, images

    chunks = [todo[b : b + batch_size] for b in range(0, len(todo), batch_size)]
    last_index = time.monotonic()
    with ThreadPoolExecutor(1) as reader:  # the next batch is read (or downloaded) while this one is embedded
        pending = reader.submit(read, chunks[0]) if chunks else None
        for i, chunk in enumerate(chunks):
            batch, images = pending.result()
            if i + 1 < len(chunks):
                pending = reader.submit(read, chunks[i + 1])
            if batch:
                emb, trunk = embed(images)
                added += archive.add(
                    [
                        CaseRecord(
                            h, f.label, f.patient_id, f.plane, f.area_mm2, str(f.path), e, t, f.source_case, f.report
                        )
                        for (f, h), e, t in zip(batch, emb, trunk)
                    ],
                    index=False,
                )
            if time.monotonic() - last_index >= index_every_s:
                archive.index_pending()
                last_index = time.monotonic()
            if progress:
                progress(len(chunk))
    archive.index_pending()
    return {"added": added, "already_there": skipped, "errors": errors, "total": len(archive)}


def ingest(
    folder: Path | str | None,
    archive_root: Path | str,
    run: Path | str,
    store: str = "flat",
    milvus_uri: str | None = None,
    milvus_index: str = "FLAT",
    folds: Iterable[int] | None = None,
    batch_size: int = 32,
    index_every_s: float = 30.0,
    progress: Callable[[int, int], None] | None = None,
    dicomweb: str | None = None,
    labels: Path | str | None = None,
    study: str | None = None,
) -> dict:
    """``neurocbir add``: embed the new scans of ``folder`` (or of the DICOMweb server
    ``dicomweb`` that ``labels`` labels, optionally one ``study``) with ``run``'s encoder into
    the archive at ``archive_root`` (created for that encoder if missing), holding the writer
    lock. ``progress(done, total)`` is called as files are handled. Returns the counts, the
    errors and the archive's consistency check."""
    from .inference import load_model

    if (folder is None) == (dicomweb is None):
        raise ArchiveError("give a folder of scans or a DICOMweb server (--dicomweb URL --labels CSV), not both")
    if dicomweb is not None and labels is None:
        raise ArchiveError(
            "a DICOMweb ingest needs --labels: a CSV with sop_instance_uid,label[,patient_id,plane,area_mm2,report]"
        )
    with writer_lock(archive_root):  # before the model loads: a second writer stops at once
        unlabelled = 0
        if dicomweb is not None:
            from .dicomweb import scan_dicomweb

            files, unlabelled = scan_dicomweb(dicomweb, labels, Path(archive_root) / "images", study)
        else:
            files = scan_folder(folder, folds)
        model = load_model(run)
        archive = CaseArchive.create(
            archive_root, model.embedding_dim, model.checkpoint_sha256, store, milvus_uri, str(run), milvus_index
        )
        try:
            done = 0

            def step(n: int) -> None:
                nonlocal done
                done += n
                if progress:
                    progress(done, len(files))

            out = add_folder(archive, files, model.embed, batch_size, step, index_every_s)
            return {**out, "store": archive.meta["store"], "check": archive.check(), "unlabelled": unlabelled}
        finally:
            archive.close()


def index_run(
    run: Path | str,
    data: Path | str | None = None,
    trial: int | None = None,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Embed every case of the dataset with a run's trial and write the trial's archive index
    (training folds) and test embeddings: what a run trained elsewhere (a GPU machine, the
    bundled model) needs before it can be served or evaluated here. Returns the trial folder."""
    import torch

    from .files import atomic_write
    from .index import VectorIndex
    from .inference import load_model
    from .runs import trial_dir, trial_seeds

    run = Path(run)
    if trial is None:
        seeds = trial_seeds(run, needs="checkpoint.pt")
        if not seeds:
            raise FileNotFoundError(f"{run} has no trial with a checkpoint.pt")
        trial = seeds[0]
    model = load_model(run, trial)
    table = load_cases(data if data is not None else model.config.data)
    embs, descs = [], []
    with torch.inference_mode():
        for b in range(0, len(table), batch_size):
            e, d = model.embed([table.load_image(i) for i in range(b, min(b + batch_size, len(table)))])
            embs.append(e)
            descs.append(d)
            if progress:
                progress(min(b + batch_size, len(table)), len(table))
    emb, desc = np.concatenate(embs), np.concatenate(descs)
    train_rows, test_rows = (
        np.flatnonzero(table.fold != model.config.fold),
        np.flatnonzero(table.fold == model.config.fold),
    )
    arrays = dict(
        archive=emb[train_rows],
        archive_rows=train_rows,
        test=emb[test_rows],
        test_rows=test_rows,
        archive_trunk=desc[train_rows],
        test_trunk=desc[test_rows],
    )
    tdir = trial_dir(run, trial)
    atomic_write(tdir / "embeddings.npz", lambda tmp: np.savez(tmp, **arrays))
    VectorIndex.build(emb[train_rows], model.checkpoint_sha256).save(tdir / "index.faiss")
    return tdir
