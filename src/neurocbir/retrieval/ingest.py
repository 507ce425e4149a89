"""Ingestion: folders of scans, or a PACS, into a case archive (``neurocbir add``).

A folder is the bundled dataset layout, the figshare ``.mat`` release, or any folder of
PNG/JPEG/DICOM/.mat scans with a ``cases.csv``; a PACS is a DICOMweb server with a labels CSV
(:mod:`neurocbir.retrieval.dicomweb`). Cases are keyed by content hash (or SOP Instance UID hash),
embedded in batches while the next batch is read, and committed one batch at a time
(:mod:`neurocbir.retrieval.archive` makes each step crash-safe), so a killed ingest resumes where it stopped.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from neurocbir.data.cases import load_cases
from neurocbir.errors import NeurocbirError
from neurocbir.files import sha256_file, writer_lock
from neurocbir.retrieval.archive import ArchiveError, CaseArchive, CaseRecord
from neurocbir.retrieval.casefiles import CaseFile, scan_folder
from neurocbir.retrieval.duplicates import SIDE, DuplicateIndex, ImagePrints
from neurocbir.retrieval.examples import add_examples

# images -> (embeddings, trunk descriptors): a model's embedding function, as `add_folder` calls it
Embedder = Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]]


class DuplicateCheck:
    """Which incoming images an archive already holds (re-encoded, resized, cropped a little or
    mirrored: :mod:`neurocbir.retrieval.duplicates`), this run's earlier files included."""

    def __init__(self, archive: CaseArchive, keep: bool = False):
        self.archive, self.keep = archive, keep
        self.index = DuplicateIndex.of_archive(archive)
        self.found: list[dict] = []
        self._pending: dict[int, str] = {}  # a temporary id (< 0) -> content hash, until committed

    def split(self, batch: list, images: list[np.ndarray], remember: bool = True) -> tuple[list, list, list]:
        """(files, images, fingerprints) to add: those that duplicate nothing (all of them with
        ``keep``); the others are recorded in :attr:`found`. ``remember``: later files are checked
        against these too (not for examples, which are never searched). FAISS's and numpy's
        products here are small: on one thread, not beside the CNN's spinning threads (adding 800
        figshare scans on 2 cores, the check took 1.24-1.29x as long on the process's threads:
        docs/results.md, bulk)."""
        with _controller().limit(limits=1):
            return self._split(batch, images, remember)

    def _split(self, batch: list, images: list[np.ndarray], remember: bool) -> tuple[list, list, list]:
        kept, kept_images, prints = [], [], []
        for (f, h), image in zip(batch, images):
            pair = ImagePrints(image)
            dup = self.index.find(pair)
            if dup:  # a duplicate of one of this run's files has its temporary id until :meth:`resolved`
                self.found.append(
                    {"file": f.shown_name, "case_id": dup[0].case_id, "mirrored": dup[0].mirrored, "kept": self.keep}
                )
                if not self.keep:
                    continue
            stored = pair.stored  # float16, as the archive keeps it
            if remember:  # later files are compared with the print the archive will hold: the same
                # decision as when they are added again after this run (a resumed add)
                temp = -(len(self._pending) + 1)
                self._pending[temp] = h
                self.index.add([temp], stored[None, : SIDE * SIDE], stored[None, SIDE * SIDE :])
            kept.append((f, h))
            kept_images.append(image)
            prints.append(stored)
        return kept, kept_images, prints

    def resolved(self) -> list[dict]:
        """:attr:`found`, a duplicate of one of this run's files given that file's case id (once
        committed; :meth:`split` knows it by a temporary id, as it may be in the same batch)."""
        earlier = [self._pending[d["case_id"]] for d in self.found if d["case_id"] < 0]
        ids = self.archive.ids_of(earlier) if earlier else {}
        return [
            {**d, "case_id": ids.get(self._pending[d["case_id"]], d["case_id"])} if d["case_id"] < 0 else d
            for d in self.found
        ]


@functools.cache
def _controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def add_folder(
    archive: CaseArchive,
    files: list[CaseFile],
    embed: Embedder,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    index_every_s: float = 30.0,
    keep_duplicates: bool = False,
) -> dict:
    """Embed and add the files the archive does not hold yet, one committed batch at a time
    (so a killed run resumes where it stopped). The store is written every ``index_every_s``
    seconds and at the end (saving a large index per batch would dominate); committed cases
    not yet in the store are indexed on the next open. Unreadable files are skipped and reported;
    so are images the archive already holds in another file (a re-encoded, resized, slightly
    cropped or mirrored copy), unless ``keep_duplicates``."""
    hashes = [f.key or sha256_file(f.path) for f in files]
    known = archive.ids_of(hashes)
    todo = [(f, h) for f, h in zip(files, hashes) if h not in known]
    seen: set[str] = set()
    todo = [(f, h) for f, h in todo if not (h in seen or seen.add(h))]  # the same file twice in one folder
    added, skipped, errors = 0, len(files) - len(todo), []
    dups = DuplicateCheck(archive, keep_duplicates)
    if progress:
        progress(skipped)

    def read(chunk: list) -> tuple[list, list]:
        batch, images = [], []
        for f, h in chunk:
            try:
                images.append(f.pixels())
                batch.append((f, h))
            except (NeurocbirError, OSError) as exc:  # a file the readers refuse (a bug still raises)
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
            batch, images, prints = dups.split(batch, images)
            if batch:
                emb, trunk = embed(images)
                added += archive.add(
                    [
                        CaseRecord(
                            h, f.label, f.patient_id, f.plane, f.area_mm2, str(f.path), e, t, f.source_case, f.report, p
                        )
                        for (f, h), e, t, p in zip(batch, emb, trunk, prints)
                    ],
                    index=False,
                )
            if time.monotonic() - last_index >= index_every_s:
                archive.index_pending()
                last_index = time.monotonic()
            if progress:
                progress(len(chunk))
    archive.index_pending()
    found = dups.resolved()
    return {"added": added, "already_there": skipped, "duplicates": found, "errors": errors, "total": len(archive)}


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
    part: str | None = None,
    as_examples: bool = False,
    keep_duplicates: bool = False,
    store_wait_s: float | None = None,
) -> dict:
    """``neurocbir add``: embed the new scans of ``folder`` (or of the DICOMweb server
    ``dicomweb`` that ``labels`` labels, optionally one ``study``) with ``run``'s encoder into
    the archive at ``archive_root`` (created for that encoder if missing), holding the writer
    lock. ``progress(done, total)`` is called as files are handled. Returns the counts, the
    errors and the archive's consistency check. ``part``: of a folder of other hospitals' slices,
    only its development or validation part. ``as_examples``: store the scans as held-out
    examples to try the app with, never searched (:mod:`neurocbir.retrieval.examples`); an example
    that duplicates an archive case is left out (it would only find itself). ``keep_duplicates``:
    add images that duplicate a stored case all the same (each is still reported)."""
    from neurocbir.models.inference import load_model
    from neurocbir.models.runs import first_weights

    if (folder is None) == (dicomweb is None):
        raise ArchiveError("give a folder of scans or a DICOMweb server (--dicomweb URL --labels CSV), not both")
    if dicomweb is not None and labels is None:
        raise ArchiveError(
            "a DICOMweb ingest needs --labels: a CSV with sop_instance_uid,label[,patient_id,plane,area_mm2,report]"
        )
    with writer_lock(archive_root):  # before the model loads: a second writer stops at once
        unlabelled = 0
        if dicomweb is not None:
            from neurocbir.retrieval.dicomweb import scan_dicomweb

            files, unlabelled = scan_dicomweb(dicomweb, labels, Path(archive_root) / "images", study)
        else:
            files = scan_folder(folder, folds, part)
        model = load_model(run, first_weights(run))  # an archive needs no index of the run's own
        archive = CaseArchive.create(
            archive_root,
            model.embedding_dim,
            model.checkpoint_sha256,
            store,
            milvus_uri,
            str(run),
            milvus_index,
            store_wait_s=store_wait_s,
        )
        try:
            if as_examples:
                added, there, found = add_examples(archive, files, DuplicateCheck(archive, keep_duplicates))
                if progress:
                    progress(len(files), len(files))
                return {
                    "added": added,
                    "already_there": there,
                    "errors": [],
                    "total": len(archive),
                    "examples": True,
                    "duplicates": found,
                    "store": archive.meta["store"],
                    "check": archive.check(),
                    "unlabelled": unlabelled,
                }
            done = 0

            def step(n: int) -> None:
                nonlocal done
                done += n
                if progress:
                    progress(done, len(files))

            out = add_folder(archive, files, model.embed, batch_size, step, index_every_s, keep_duplicates)
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

    from neurocbir.files import atomic_write
    from neurocbir.models.inference import load_model
    from neurocbir.models.runs import trial_dir, trial_seeds
    from neurocbir.retrieval.index import VectorIndex

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


def remove_cases(root: Path | str, case_ids: Iterable[int]) -> tuple[list[int], int]:
    """``neurocbir remove``: (ids removed, cases left), holding the writer lock."""
    if not (Path(root) / CaseArchive.DB).is_file():
        raise FileNotFoundError(f"no case archive at {root} (expected {CaseArchive.DB})")
    with writer_lock(root):
        archive = CaseArchive.open(root)
        try:
            return archive.delete(case_ids), len(archive)
        finally:
            archive.close()
