"""The SQLite case archive: `neurocbir add` is resumable after SIGKILL at random points, every
crash window of the add / delete protocol is repaired on reopen, and the archive-backed
service answers like the run it was built from."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import closing

import numpy as np
import pytest
from typer.testing import CliRunner

from neurocbir.cli import app as cli
from neurocbir.files import writer_lock
from neurocbir.models.runs import checkpoint_sha256
from neurocbir.reports.text import parse_report
from neurocbir.retrieval.archive import ArchiveError, CaseArchive, CaseRecord
from neurocbir.retrieval.casefiles import scan_folder
from neurocbir.retrieval.index import IndexMismatchError


def _sha(run):
    return checkpoint_sha256(run, 0)


def _add_cmd(folder, archive, run, *extra):
    """`neurocbir add` as a hospital runs it; these tests are about crash safety and counts, so a
    patient's neighbouring slices are kept even where they look nearly alike (tests/test_duplicates.py
    checks what is taken for a duplicate)."""
    return [
        sys.executable,
        "-m",
        "neurocbir.cli",
        "add",
        str(folder),
        "--archive",
        str(archive),
        "--run",
        str(run),
        "--keep-duplicates",
        *extra,
    ]


def _count(archive_dir) -> int:
    import sqlite3

    try:
        with closing(sqlite3.connect(f"file:{archive_dir / 'archive.db'}?mode=ro", uri=True, timeout=5)) as db:
            return db.execute("SELECT COUNT(*) FROM cases").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def _assert_consistent(archive_dir, expected_hashes: set[str]) -> CaseArchive:
    arch = CaseArchive.open(archive_dir)
    check = arch.check()
    assert check["integrity"] == "ok" and check["duplicates"] == 0
    assert check["states"] == {"indexed": len(expected_hashes)}
    ids, _ = arch.embeddings()
    assert arch.store.count() == len(ids) and arch.store.contains(ids).all()
    hashes = {r[0] for r in arch.db.execute("SELECT content_sha256 FROM cases")}
    assert hashes == expected_hashes
    return arch


@pytest.fixture(scope="module")
def scans(small_cases, tmp_path_factory):
    """A hospital-style folder: 48 JPEG scans + cases.csv, one file duplicated under another name."""
    out = tmp_path_factory.mktemp("scans")
    root = small_cases.loader.root
    rows = np.random.default_rng(3).choice(len(small_cases), 48, replace=False)
    with open(out / "cases.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", "patient_id", "plane", "area_mm2"])
        for r in rows:
            idx = int(small_cases.idx[r])
            shutil.copy(root / "images" / f"{idx}.jpg", out / f"scan_{idx}.jpg")
            w.writerow(
                [
                    f"scan_{idx}.jpg",
                    int(small_cases.label[r]) + 1,
                    small_cases.patient_id[r],
                    small_cases.plane[r],
                    round(float(small_cases.area_mm2[r]), 2),
                ]
            )
        first = int(small_cases.idx[rows[0]])
        shutil.copy(out / f"scan_{first}.jpg", out / "copy_of_first.jpg")
        w.writerow(["copy_of_first.jpg", int(small_cases.label[rows[0]]) + 1, small_cases.patient_id[rows[0]], "", ""])
    return out


@pytest.fixture(scope="module")
def reference(scans, small_run, tmp_path_factory):
    """The archive an uninterrupted `neurocbir add` builds."""
    out = tmp_path_factory.mktemp("ref") / "archive"
    r = subprocess.run(_add_cmd(scans, out, small_run), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "48 cases added, 1 already there" in r.stdout  # the duplicate file is stored once
    return out


class _Reader(threading.Thread):
    """A reader (as the app opens an archive) searching over and over while `add` is killed."""

    def __init__(self, archive, queries):
        super().__init__(daemon=True)
        self.archive, self.queries, self.stop, self.errors, self.searches = archive, queries, False, [], 0

    def run(self):
        while not self.stop:
            if not (self.archive / "archive.db").is_file():
                time.sleep(0.02)
                continue
            try:
                arch = CaseArchive.open(self.archive, writer=False)
                try:
                    indexed = len(arch.columns()["id"])
                    if arch.store.count() and indexed:
                        _, ids = arch.store.search(self.queries, 3)
                        found = arch.cases([int(i) for i in ids.ravel() if i >= 0])
                        assert len(found) <= len(set(ids.ravel().tolist()) - {-1})
                        self.searches += 1
                finally:
                    arch.close()
            except Exception as exc:  # noqa: BLE001 - any failure of a reader is what we look for
                self.errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.01)


@pytest.mark.parametrize("index_every", ["0", "30"])  # index written per batch, and the default
def test_add_survives_sigkill_at_random_points(scans, small_run, reference, tmp_path, index_every, test_seed):
    ref = CaseArchive.open(reference)
    ref_ids, ref_emb = ref.embeddings()
    ref_by_hash = {
        h: ref_emb[np.searchsorted(ref_ids, i)] for i, h in ref.db.execute("SELECT id, content_sha256 FROM cases")
    }
    ref.close()
    archive = tmp_path / "archive"
    rng = np.random.default_rng(test_seed)
    reader = _Reader(archive, np.stack(list(ref_by_hash.values()))[:4])
    reader.start()
    partial = []
    for target in sorted(rng.choice(np.arange(1, 37), 4, replace=False)):  # leave batches after the last kill
        proc = subprocess.Popen(
            _add_cmd(scans, archive, small_run, "--batch-size", "4", "--index-every", index_every),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # wait until the archive holds `target` cases, then kill a random moment later: the kill
        # lands while embedding, committing, writing the index or marking rows
        while proc.poll() is None and _count(archive) < target:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.15))  # a 48-case add takes about a second on a fast CPU
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        arch = CaseArchive.open(archive)  # reopening repairs whatever the kill interrupted
        check = arch.check()
        assert check["duplicates"] == 0 and check["integrity"] == "ok" and check["store_count"] == len(arch)
        partial.append(len(arch))
        arch.close()
    assert sum(0 < n < 48 for n in partial) >= 3, partial  # most kills interrupted a run half-way
    reader.stop = True
    reader.join(30)
    assert not reader.errors and reader.searches > 0, (reader.errors[:3], reader.searches)
    done = subprocess.run(_add_cmd(scans, archive, small_run), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    arch = _assert_consistent(archive, set(ref_by_hash))
    ids, emb = arch.embeddings()
    for i, h in arch.db.execute("SELECT id, content_sha256 FROM cases"):
        assert np.allclose(emb[np.searchsorted(ids, i)], ref_by_hash[h], atol=1e-5)
    arch.close()


def _records(n: int, dim: int = 8, start: int = 0) -> list[CaseRecord]:
    rng = np.random.default_rng(start)
    return [
        CaseRecord(
            f"h{start + i}",
            i % 3,
            f"p{(start + i) // 2}",
            "axial",
            100.0 + i,
            f"/x/{start + i}.png",
            rng.normal(size=dim).astype(np.float32),
        )
        for i in range(n)
    ]


def _store_args(store: str, request) -> dict:
    """The archive's store: FAISS, Milvus Lite (its file in the archive) or the real server."""
    if store == "milvus-server":
        return {"store": "milvus", "milvus_uri": request.getfixturevalue("milvus_server").uri}
    return {"store": store}


@pytest.mark.parametrize("store", ["flat", "hnsw", "milvus", "milvus-server"])
def test_every_crash_window_is_repaired_on_reopen(tmp_path, store, request):
    arch = CaseArchive.create(tmp_path / "a", 8, "ck", **_store_args(store, request))
    assert arch.add(_records(30)) == 30
    # 1. killed after the table commit, before the store was written: rows pending, store lacks them
    arch.add(_records(10, start=30), index=False)
    arch.close()
    arch = CaseArchive.open(tmp_path / "a", "ck", 8)
    assert arch.check()["states"] == {"indexed": 40} and arch.store.count() == 40
    # 2. killed after the store was saved, before the rows were marked: no duplicates on retry
    arch.add(_records(5, start=40), index=False)
    ids = np.array([r[0] for r in arch.db.execute("SELECT id FROM cases WHERE state = 'pending'")])
    vecs = np.stack([r.embedding for r in _records(5, start=40)])
    arch.store.add(ids, vecs)
    arch.store.save()
    arch.close()
    arch = CaseArchive.open(tmp_path / "a", "ck", 8)
    assert arch.check()["states"] == {"indexed": 45} and arch.store.count() == 45
    # 3. killed in the middle of a delete: the rows marked, the store untouched
    victims = ids[:3]
    arch.db.executemany("UPDATE cases SET state = 'deleting' WHERE id = ?", [(int(i),) for i in victims])
    arch.close()
    arch = CaseArchive.open(tmp_path / "a", "ck", 8)
    assert len(arch) == 42 and arch.store.count() == 42 and not arch.store.contains(victims).any()
    # re-adding the same content is a no-op; deleted content can come back
    assert arch.add(_records(30)) == 0
    assert arch.add(_records(5, start=40)) == 3
    arch.close()
    # a reader (the app) repairs nothing: it sees the indexed cases and writes no file
    arch = CaseArchive.open(tmp_path / "a", "ck", 8)
    arch.add(_records(4, start=100), index=False)  # committed, not yet in the store: a crash window
    pending = arch._ids("pending")
    arch.close()
    files = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.name.startswith("index")}
    reader = CaseArchive.open(tmp_path / "a", "ck", 8, writer=False)
    assert reader.check()["states"] == {"indexed": 45, "pending": 4} and len(reader.columns()["id"]) == 45
    with pytest.raises(Exception, match="readonly|read-only|query_only"):
        reader.db.execute("DELETE FROM cases")
    reader.close()
    assert files == {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.name.startswith("index")}
    arch = CaseArchive.open(tmp_path / "a", "ck", 8)  # the writer finishes the job
    assert arch.check()["states"] == {"indexed": 49} and arch.store.count() == 49
    assert arch.delete(pending) == pending.tolist()  # back to the 45 below
    arch.close()
    if not store.startswith("milvus"):
        # 4. the store file lost or truncated: rebuilt from the table
        (tmp_path / "a" / "index.faiss").write_bytes(b"\0" * 10)
        arch = CaseArchive.open(tmp_path / "a", "ck", 8)
        assert arch.store.count() == 45 and arch.check()["states"] == {"indexed": 45}
        q = np.stack([r.embedding for r in _records(3)])
        _, found = arch.store.search(q, 1)
        assert (found[:, 0] == [1, 2, 3]).all()  # each finds itself
        arch.close()


@pytest.mark.parametrize("store", ["flat", "milvus", "milvus-server"])
def test_stores_made_before_partitions_are_rebuilt_on_open(tmp_path, store, request):
    """An archive whose store predates the tumor type / plane partitions (a single FAISS index
    file, or a Milvus collection without the group field) is rebuilt from the table by the
    writer; a reader searches an in-memory copy meanwhile. Filters then pick partitions."""
    import json

    import faiss

    from neurocbir.retrieval.index import write_index
    from neurocbir.serving.sources import CaseFilter

    records = _records(30)
    arch = CaseArchive.create(tmp_path / "a", 8, "ck", **_store_args(store, request))
    arch.add(records)
    collection = arch.meta.get("milvus_collection")
    uri = arch.meta.get("milvus_uri") or str(tmp_path / "a" / "milvus.db")
    arch.close()
    vecs = np.stack([r.embedding for r in records])
    if store == "flat":  # the old format: one FAISS index file
        old = faiss.IndexIDMap2(faiss.IndexFlatL2(8))
        old.add_with_ids(vecs, np.arange(1, 31, dtype=np.int64))
        write_index(old, tmp_path / "a" / "index.faiss", {"checkpoint_sha256": "ck", "dim": 8, "kind": "flat"})
    else:  # the old collection: no group field, its manifest without "groups"
        from pymilvus import MilvusClient

        client = MilvusClient(uri)
        client.drop_collection(collection)
        client.create_collection(
            collection, dimension=8, metric_type="L2", auto_id=False, id_type="int",
            description=json.dumps({"checkpoint_sha256": "ck", "dim": 8}),
        )  # fmt: skip
        client.upsert(collection, [{"id": i + 1, "vector": v.tolist()} for i, v in enumerate(vecs)])
        client.close()
    reader = CaseArchive.open(tmp_path / "a", "ck", 8, writer=False)
    assert reader.store.count() == 30  # an in-memory copy, nothing written
    reader.close()
    arch = CaseArchive.open(tmp_path / "a", "ck", 8)
    groups = CaseFilter(tumor_type="glioma").groups()
    _, found = arch.store.search(vecs, 3, groups=groups)
    labels = {i + 1: r.label for i, r in enumerate(records)}
    assert all(labels[int(i)] == 1 for i in found.ravel() if i >= 0) and (found >= 0).all()
    arch.close()


def test_archive_refuses_other_encoders_and_bad_input(tmp_path, scans):
    CaseArchive.create(tmp_path / "a", 8, "ck").close()
    with pytest.raises(IndexMismatchError, match="checkpoint"):
        CaseArchive.open(tmp_path / "a", "other", 8)
    with pytest.raises(IndexMismatchError, match="8-d"):
        CaseArchive.create(tmp_path / "a", 16, "ck")
    arch = CaseArchive.open(tmp_path / "a")
    with pytest.raises(ArchiveError, match="8 finite"):
        arch.add([CaseRecord("x", 0, "p", "", None, "f", np.full(8, np.nan, np.float32))])
    with pytest.raises(ArchiveError, match="label 7"):
        arch.add([CaseRecord("x", 7, "p", "", None, "f", np.zeros(8, np.float32))])
    assert len(arch) == 0
    # patient ids are stored only as salted hashes
    arch.add(_records(2))
    assert not {r[0] for r in arch.db.execute("SELECT patient_key FROM cases")} & {"p0"}
    # an unreachable server is waited for, boundedly
    with pytest.raises(ArchiveError, match="Milvus at http://127.0.0.1:1.*after waiting 1 s"):
        CaseArchive.create(tmp_path / "m", 8, "ck", store="milvus", milvus_uri="http://127.0.0.1:1", store_wait_s=1)
    assert not (tmp_path / "m" / "archive.db").exists()  # nothing half-made left behind
    with pytest.raises(ArchiveError, match="unknown store"):
        CaseArchive.create(tmp_path / "b", 8, "ck", store="redis")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cases.csv").write_text("file,label\nnope.jpg,glioma\n")
    with pytest.raises(ArchiveError, match="no file 'nope.jpg'"):
        scan_folder(tmp_path / "bad")
    (tmp_path / "bad" / "cases.csv").write_text("file,label\n../etc.jpg,glioma\n")
    with pytest.raises(ArchiveError, match="no file"):
        scan_folder(tmp_path / "bad")
    (tmp_path / "bad" / "x.jpg").write_bytes((scans / "copy_of_first.jpg").read_bytes())
    (tmp_path / "bad" / "cases.csv").write_text("file,label\nx.jpg,lymphoma\n")
    with pytest.raises(ArchiveError, match="lymphoma"):
        scan_folder(tmp_path / "bad")
    with pytest.raises(ArchiveError, match="neither metadata.csv"):
        scan_folder(tmp_path)


def test_add_cli_skips_unreadable_files_and_reports_them(scans, small_run, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    names = sorted(p.name for p in scans.glob("scan_*.jpg"))[:3]
    for n in names:
        shutil.copy(scans / n, folder / n)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (folder / "cases.csv").write_text("file,label\n" + "".join(f"{n},glioma\n" for n in names) + "broken.jpg,glioma\n")
    r = subprocess.run(_add_cmd(folder, tmp_path / "arch", small_run), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "3 cases added" in r.stdout and "skipped broken.jpg" in r.stdout
    r = subprocess.run(
        _add_cmd(tmp_path / "nowhere", tmp_path / "arch", small_run), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2 and "no such folder" in r.stderr and "Traceback" not in r.stderr
    with writer_lock(tmp_path / "arch"):  # one writer at a time
        r = subprocess.run(_add_cmd(folder, tmp_path / "arch", small_run), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "another `neurocbir add` is writing" in r.stderr


@pytest.fixture(scope="module")
def training_archive(small_run, small_data_dir, tmp_path_factory):
    """The run's training folds added to an HNSW archive with `neurocbir add`."""
    out = tmp_path_factory.mktemp("train_archive") / "arch"
    r = subprocess.run(
        _add_cmd(
            small_data_dir,
            out,
            small_run,
            "--fold",
            "1",
            "--fold",
            "2",
            "--fold",
            "3",
            "--fold",
            "4",
            "--store",
            "hnsw",
        ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    return out


def test_archive_service_matches_the_run(small_run, small_cases, training_archive):
    """An archive built by `neurocbir add` from the run's training folds gives the same NIR
    prediction as the run's own index for held-out scans, and serves evidence with reports."""
    from neurocbir.serving.service import RetrievalService

    run_svc = RetrievalService.from_run(small_run, table=small_cases)
    svc = RetrievalService.from_archive(small_run, training_archive)
    assert svc.archive_size == len(run_svc.cases.archive_rows)
    agree, overlap = 0, []
    for row in run_svc.cases.example_rows[:12]:
        img = small_cases.load_image(int(row))
        a, b = run_svc.query(img, k=5), svc.query(img, k=5)
        agree += a["prediction"] == b["prediction"]
        assert b["retrievals"] and all(x["label"] and x["plane"] for x in b["retrievals"])
        # the archive's ids are its own; the cases behind them are the same ones
        src = svc.cases.archive.cases([x["case_id"] for x in b["retrievals"]])
        overlap.append(
            len({src[x["case_id"]]["source_case"] for x in b["retrievals"]} & {x["case_id"] for x in a["retrievals"]})
        )
    # the run embedded float16 cached features, the archive float32 pixels: near-ties may swap
    assert agree >= 11 and np.mean(overlap) >= 4
    dedup = svc.query(small_cases.load_image(int(run_svc.cases.example_rows[0])), k=10, one_per_patient=True)
    keys = svc.cases.group_of(np.array([x["case_id"] for x in dedup["retrievals"]]))
    assert len(set(keys.tolist())) == len(keys)
    cid = dedup["retrievals"][0]["case_id"]
    parsed = parse_report(svc.cases.reports([cid])[0])
    assert parsed.tumor_type == dedup["retrievals"][0]["label"] and parsed.plane == dedup["retrievals"][0]["plane"]
    assert svc.cases.mask(cid).any() and svc.cases.image(cid).ndim == 2
    with pytest.raises(KeyError):
        svc.cases.case(10**9)


def test_partitioned_archive_filters_find_the_exact_nearest_passing_cases(small_run, small_cases, training_archive):
    """The archive's store is partitioned by tumor type and plane; type / plane filters pick
    partitions and size ranges are over-fetched and checked (or, when too few pass, an ID
    selector): every filter returns exactly the nearest passing cases of a brute-force search."""
    from neurocbir.retrieval.archive import CaseArchive
    from neurocbir.serving.archive_cases import ArchiveCases
    from neurocbir.serving.sources import CaseFilter

    cases = ArchiveCases(training_archive, CaseArchive.open(training_archive, writer=False).checkpoint_sha256, 128)
    assert len(cases.store.parts) > 3  # type x plane
    ids, emb = cases.archive.embeddings()
    areas = sorted(cases.attr_area)
    lo, mid, hi = (float(areas[int(q * (len(areas) - 1))]) for q in (0.25, 0.5, 0.95))
    filters = [
        CaseFilter(tumor_type="glioma"),
        CaseFilter(plane="sagittal"),
        CaseFilter(plane="axial", tumor_type="pituitary"),
        CaseFilter(min_area_mm2=lo, max_area_mm2=mid),  # about a quarter: over-fetched and checked
        CaseFilter(min_area_mm2=hi),  # 5 %: the over-fetch falls short, the ID selector answers
        CaseFilter(plane="coronal", tumor_type="meningioma", max_area_mm2=mid),
    ]
    for q in emb[:: max(1, len(emb) // 6)][:6] + 0.05:
        for f in filters:
            dist, found = cases.filtered(q[None], f, 5, one_per_patient=False)
            passing = f.mask(cases.attr_label, cases.attr_plane, cases.attr_area)
            d = np.linalg.norm(emb[passing] - q, axis=1)
            ref = ids[passing][np.argsort(d)[:5]]
            assert len(found) == min(5, passing.sum())
            # HNSW partitions: nearly exact; the distances are the true ones, sorted
            assert len(set(found.tolist()) & set(ref.tolist())) >= len(found) - 1, f
            assert np.allclose(np.sort(dist), dist) and (dist >= np.sort(d)[0] - 1e-4).all()


def test_http_api_over_an_archive(small_run, small_cases, training_archive):
    from fastapi.testclient import TestClient

    from neurocbir.app.api import create_app
    from neurocbir.serving.service import RetrievalService

    svc = RetrievalService.from_archive(small_run, training_archive)
    client = TestClient(create_app(svc))
    assert client.get("/health").json()["archive_cases"] == svc.archive_size > 0
    test_row = int(np.flatnonzero(small_cases.fold == 5)[0])
    jpg = (small_cases.loader.root / "images" / f"{int(small_cases.idx[test_row])}.jpg").read_bytes()
    out = client.post("/query?k=3", files={"file": ("q.jpg", jpg, "image/jpeg")}).json()
    assert (
        len(out["retrievals"]) == 3
        and out["prediction"] in out["probabilities"]
        and "not a diagnosis" in out["disclaimer"]
    )
    ids = [r["case_id"] for r in out["retrievals"]]
    summary = client.post("/summary", json={"case_ids": ids}).json()
    assert summary["source"] and len(summary["reports"]) == 3
    assert client.get(f"/cases/{ids[0]}/image.png?outline=true").headers["content-type"] == "image/png"
    assert client.get("/cases/999999").status_code == 404
    assert client.get("/examples").json()["examples"] == []


def test_add_a_figshare_release_folder(figshare_dir, small_run, tmp_path):
    """The original .mat release goes into an archive too; the image and mask come back from the .mat."""
    from neurocbir.models.inference import load_model
    from neurocbir.retrieval.ingest import add_folder

    model = load_model(small_run)
    files = scan_folder(figshare_dir)
    assert [f.path.name for f in files] == ["1.mat", "2.mat", "3.mat", "4.mat"]
    arch = CaseArchive.create(tmp_path / "a", model.embedding_dim, _sha(small_run))
    out = add_folder(arch, files, model.embed, batch_size=3)
    assert out["added"] == 4 and not out["errors"]
    cases = arch.cases([1, 2, 3, 4])
    assert [c["label"] for c in cases.values()] == ["meningioma", "glioma", "pituitary", "meningioma"]
    assert cases[3]["area_mm2"] == pytest.approx(200 * 4 * 0.49 * 0.49)  # 256 grid scaled to 512
    arch.close()
    from neurocbir.serving.service import RetrievalService

    svc = RetrievalService.from_archive(small_run, tmp_path / "a")
    assert svc.cases.image(3).shape == (256, 256) and svc.cases.mask(3).sum() == 200
    assert svc.query(svc.cases.image(2), k=1)["retrievals"][0]["case_id"] == 2
    # `neurocbir remove`: the case leaves the table and the store; unknown ids are named
    scan = svc.cases.image(2)
    svc.cases.archive.close()
    res = CliRunner().invoke(cli, ["remove", "2", "999", "--archive", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "1 case(s) removed" in res.output and "holds 3 cases" in res.output and "999" in res.output
    arch = CaseArchive.open(tmp_path / "a")
    assert arch.check()["store_count"] == len(arch) == 3 and not arch.cases([2])
    arch.close()
    after = RetrievalService.from_archive(small_run, tmp_path / "a").query(scan, k=3)
    assert 2 not in [r["case_id"] for r in after["retrievals"]]
    missing = CliRunner().invoke(cli, ["remove", "1", "--archive", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no case archive" in missing.output and not (tmp_path / "nowhere").exists()


def test_a_served_archive_follows_add_and_remove_without_a_restart(scans, small_run, reference, tmp_path):
    """The app keeps serving while `neurocbir remove` and `add` change its archive: a removed
    (say, mislabelled) case stops being evidence at once, an added one becomes evidence, and no
    query fails on a case that left after the app loaded its view."""
    from fastapi.testclient import TestClient

    from neurocbir.app.api import create_app
    from neurocbir.serving.service import RetrievalService

    archive = tmp_path / "archive"
    shutil.copytree(reference, archive)
    svc = RetrievalService.from_archive(small_run, archive)
    client = TestClient(create_app(svc))
    scan = sorted(scans.glob("scan_*.jpg"))[5]

    def query() -> dict:
        r = client.post("/query?k=3", files={"file": ("q.jpg", scan.read_bytes(), "image/jpeg")})
        assert r.status_code == 200, r.text
        return r.json()

    before = query()
    itself = before["retrievals"][0]
    assert itself["distance"] < 1e-3  # the scan is in the archive: it finds itself
    size = client.get("/health").json()["archive_cases"]
    assert not svc.refresh_cases()  # nothing changed yet

    res = CliRunner().invoke(cli, ["remove", str(itself["case_id"]), "--archive", str(archive)])
    assert res.exit_code == 0, res.output
    after = query()  # the view loaded before the removal holds the case: it must not come back
    assert itself["case_id"] not in [r["case_id"] for r in after["retrievals"]]
    assert after["retrievals"][0]["distance"] > 1e-3
    svc.refresh_cases(wait_s=None)
    assert client.get("/health").json()["archive_cases"] == size - 1

    folder = tmp_path / "new"
    folder.mkdir()
    shutil.copy(scan, folder / "again.jpg")
    with open(folder / "cases.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["file", "label"], ["again.jpg", itself["label"]]])
    r = subprocess.run(_add_cmd(folder, archive, small_run), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    back = query()
    top = back["retrievals"][0]
    assert top["distance"] < 1e-3 and top["case_id"] != itself["case_id"]  # the new case, with its new id
    assert top["label"] == itself["label"]
    assert client.get("/health").json()["archive_cases"] == size

    # every case removed: a clear 503 (no evidence left), not a crash; an add serves again
    ids = [str(i) for i in CaseArchive.open(archive, writer=False).columns()["id"]]
    assert CliRunner().invoke(cli, ["remove", *ids, "--archive", str(archive)]).exit_code == 0
    empty = client.post("/query?k=3", files={"file": ("q.jpg", scan.read_bytes(), "image/jpeg")})
    assert empty.status_code == 503 and "holds no cases" in empty.json()["detail"]
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["archive_cases"] == 0
    assert "holds no cases" in health.json()["archive_problem"]
    r = subprocess.run(_add_cmd(folder, archive, small_run), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert query()["retrievals"][0]["distance"] < 1e-3
    assert client.get("/health").json() | {"run": None, "trial": None} == {
        "status": "ok",
        "archive_cases": 1,
        "archive_problem": None,
        "run": None,
        "trial": None,
        "pacs": False,
        "worker": os.getpid(),
    }


def test_a_slow_reload_holds_no_query_past_its_bound(scans, small_run, reference, tmp_path, monkeypatch):
    """A query that meets a case removed under it waits for the archive's new view only so long: a
    503 with Retry-After that says so, the old view serving meanwhile; once the view has loaded,
    the app answers without the removed case, with no restart."""
    import threading

    from fastapi.testclient import TestClient

    from neurocbir.app.api import create_app
    from neurocbir.serving import service as service_module
    from neurocbir.serving.archive_cases import ArchiveCases
    from neurocbir.serving.service import RetrievalService

    archive = tmp_path / "archive"
    shutil.copytree(reference, archive)
    svc = RetrievalService.from_archive(small_run, archive)
    client = TestClient(create_app(svc))
    scan = sorted(scans.glob("scan_*.jpg"))[5].read_bytes()
    itself = client.post("/query?k=3", files={"file": ("q.jpg", scan, "image/jpeg")}).json()["retrievals"][0]
    release, real = threading.Event(), ArchiveCases.reopened
    monkeypatch.setattr(ArchiveCases, "reopened", lambda self: (release.wait(120), real(self))[1])
    monkeypatch.setattr(service_module, "RELOAD_WAIT_S", 0.2)
    monkeypatch.setattr(service_module, "RELOAD_MAX_WAIT_S", 0.5)
    res = CliRunner().invoke(cli, ["remove", str(itself["case_id"]), "--archive", str(archive)])
    assert res.exit_code == 0, res.output
    r = client.post("/query?k=3", files={"file": ("q.jpg", scan, "image/jpeg")})
    assert r.status_code == 503 and "still loading" in r.json()["detail"] and r.headers["Retry-After"]
    release.set()
    svc._reloading.join(60)
    r = client.post("/query?k=3", files={"file": ("q.jpg", scan, "image/jpeg")})
    assert r.status_code == 200 and itself["case_id"] not in [c["case_id"] for c in r.json()["retrievals"]]


def test_cases_added_while_serving_join_the_view_without_a_full_reload(
    scans, small_run, small_cases, reference, tmp_path, monkeypatch
):
    """`neurocbir add` in another process while the app serves: the next query finds the new case,
    the served view grown by it alone (the others' columns, vectors and prints not read again, the
    view other threads still search left as it was); a removal, or growth past REGROW_SHARE, reads
    the archive again."""
    from fastapi.testclient import TestClient

    from neurocbir.app.api import create_app
    from neurocbir.data.cases import CLASS_NAMES
    from neurocbir.serving import archive_cases
    from neurocbir.serving.archive_cases import ArchiveCases
    from neurocbir.serving.service import RetrievalService

    archive = tmp_path / "archive"
    shutil.copytree(reference, archive)
    svc = RetrievalService.from_archive(small_run, archive)
    client = TestClient(create_app(svc))
    full, real = [], ArchiveCases.reopened
    monkeypatch.setattr(ArchiveCases, "reopened", lambda self: (full.append(1), real(self))[1])
    stored = {p.name for p in scans.glob("scan_*.jpg")}
    new_rows = [r for r in range(len(small_cases)) if f"scan_{int(small_cases.idx[r])}.jpg" not in stored][:2]

    def add(row: int) -> bytes:
        folder = tmp_path / f"new{row}"
        folder.mkdir()
        data = (small_cases.loader.root / "images" / f"{int(small_cases.idx[row])}.jpg").read_bytes()
        (folder / "new.jpg").write_bytes(data)
        (folder / "cases.csv").write_text(f"file,label\nnew.jpg,{CLASS_NAMES[small_cases.label[row]]}\n")
        r = subprocess.run(_add_cmd(folder, archive, small_run), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return data

    first = svc.cases
    data = add(new_rows[0])
    out = client.post("/query?k=3", files={"file": ("q.jpg", data, "image/jpeg")}).json()
    top = out["retrievals"][0]
    assert top["distance"] < 1e-3 and top["label"] == CLASS_NAMES[small_cases.label[new_rows[0]]]
    assert full == [] and svc.cases is not first  # grown, not read again
    assert first.store.count() == 48 and svc.cases.store.count() == 49  # the old view untouched
    assert client.get("/health").json()["archive_cases"] == 49
    monkeypatch.setattr(archive_cases, "REGROW_SHARE", 0.0)  # any growth now reads the archive again
    data = add(new_rows[1])
    out = client.post("/query?k=3", files={"file": ("q.jpg", data, "image/jpeg")}).json()
    assert out["retrievals"][0]["distance"] < 1e-3 and full == [1]


def test_the_trunk_sample_is_bounded_fixed_and_whole_below_its_bound(tmp_path):
    """What a served view holds of the trunk descriptors ("no similar case", presence) does not grow
    with the archive: at most the bound, the same cases each time; an archive within the bound is
    read whole, in id order; an archive with a case lacking its descriptor gives none."""
    import dataclasses

    arch = CaseArchive.create(tmp_path / "a", 8, "ck")
    records = [dataclasses.replace(r, trunk=np.full(4, i, np.float32)) for i, r in enumerate(_records(300))]
    arch.add(records)
    whole = arch.trunk_sample(1000)
    assert len(whole["id"]) == 300 and (np.diff(whole["id"]) > 0).all()
    assert np.array_equal(whole["trunk"][:, 0], np.arange(300)) and whole["label"].tolist() == [
        i % 3 for i in range(300)
    ]
    some = arch.trunk_sample(50)
    assert len(some["id"]) == 50 and np.array_equal(some["id"], arch.trunk_sample(50)["id"])
    assert np.isin(some["id"], whole["id"]).all() and some["id"].max() - some["id"].min() > 200  # spread out
    assert np.array_equal(some["trunk"][:, 0], some["id"] - whole["id"][0])  # each id with its own descriptor
    arch.add(_records(1, start=999))  # no descriptor
    assert arch.trunk_sample(1000) is None


def test_what_the_app_reads_at_start_comes_from_narrow_indexes_also_in_older_archives(tmp_path):
    """The app's start reads every case's columns, coarse print and whether it has a trunk
    descriptor. A case's row is kilobytes wide, so each of those reads must come from an index of
    its own, not a scan of the table; an archive made before those indexes is read the same by the
    app (which never writes) and gets them at the writer's next open."""
    import dataclasses
    import sqlite3

    from neurocbir.retrieval.archive_reads import READ_INDEX_NAMES
    from neurocbir.retrieval.duplicates import FINE, SIDE

    rng = np.random.default_rng(5)
    records = [
        dataclasses.replace(
            r,
            trunk=rng.normal(size=16).astype(np.float32),
            fingerprint=rng.normal(size=SIDE * SIDE + FINE * FINE).astype(np.float16),
        )
        for r in _records(120)
    ]
    records[7] = dataclasses.replace(records[7], fingerprint=None)  # a case without a print
    CaseArchive.create(tmp_path / "a", 8, "ck").add(records)

    def start_reads(writer: bool) -> tuple[dict, list[str]]:
        arch = CaseArchive.open(tmp_path / "a", "ck", writer=writer)
        statements = []
        arch.db.set_trace_callback(statements.append)
        reads = {
            "columns": arch.columns(),
            "prints": list(arch.fingerprints(SIDE * SIDE)),
            "n_prints": arch.n_prints(),
            "trunks": arch.trunk_sample(50),
        }
        arch.db.set_trace_callback(None)
        plans = [
            " / ".join(row[3] for row in arch.db.execute("EXPLAIN QUERY PLAN " + q))
            for q in statements
            if q.lstrip().upper().startswith("SELECT") and " id IN (" not in q  # by id: the primary key
        ]
        return reads, plans

    new, plans = start_reads(writer=False)
    assert len(plans) >= 4 and not [p for p in plans if "SCAN cases" in p and "INDEX" not in p], plans
    assert sum(len(ids) for ids, _ in new["prints"]) == new["n_prints"] == 119
    with closing(sqlite3.connect(tmp_path / "a" / CaseArchive.DB)) as db:  # as archives made before 2026-12-06
        made = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE name LIKE 'cases_%'")]
        for name in READ_INDEX_NAMES:
            assert name in made
            db.execute(f"DROP INDEX {name}")
    old, plans = start_reads(writer=False)
    assert [p for p in plans if "SCAN cases" in p and "INDEX" not in p], plans  # read the slow way, not written
    upgraded, plans = start_reads(writer=True)
    assert not [p for p in plans if "SCAN cases" in p and "INDEX" not in p], plans
    for reads in (old, upgraded):
        for key in ("id", "label", "patient_key", "plane", "area_mm2"):
            assert np.array_equal(reads["columns"][key], new["columns"][key], equal_nan=key == "area_mm2")
        assert reads["n_prints"] == 119
        for (ids, coarse), (ids_new, coarse_new) in zip(reads["prints"], new["prints"], strict=True):
            assert np.array_equal(ids, ids_new) and np.array_equal(coarse, coarse_new)
        assert np.array_equal(reads["trunks"]["trunk"], new["trunks"]["trunk"])
    ids, coarse = new["prints"][0]
    assert np.array_equal(coarse[0], records[0].fingerprint[: SIDE * SIDE].astype(np.float32))


def test_a_large_archive_starts_from_its_start_file_as_from_its_table(
    scans, small_run, reference, tmp_path, monkeypatch
):
    """What the app reads of every case at start (the trunk sample, the prints' index) comes from
    one file the writer keeps beside a large archive: the view made from it answers as the one read
    from the table; cases added since join it from the table; a removal makes the writer remake it,
    and a file that no longer describes the archive (or is cut short) is passed over for the table."""
    from neurocbir.data.uploads import read_scan
    from neurocbir.models.inference import load_model
    from neurocbir.retrieval import start_file
    from neurocbir.retrieval.ingest import add_folder
    from neurocbir.serving.archive_cases import ArchiveCases

    archive, sha = tmp_path / "archive", _sha(small_run)
    shutil.copytree(reference, archive)
    path = archive / start_file.NAME
    assert not path.exists()  # 48 cases: under START_FILE_FROM, the writer made none
    images = {p.name: read_scan(p.read_bytes(), p.name) for p in sorted(scans.glob("scan_*.jpg"))}

    table_reads = []  # the start's reads of the table's trunk sample (none where the file served)
    real_sample = CaseArchive.trunk_sample
    monkeypatch.setattr(
        CaseArchive, "trunk_sample", lambda self, *a, **k: (table_reads.append(1), real_sample(self, *a, **k))[1]
    )

    def view(from_file: bool) -> ArchiveCases:
        """A served view of the archive, read from the start file or (``from_file`` False) from the table."""
        table_reads.clear()
        out = ArchiveCases(archive, sha, load_model(small_run).embedding_dim)
        assert table_reads == ([] if from_file else [1])
        return out

    def same(a: ArchiveCases, b: ArchiveCases, names) -> None:
        """The same trunk sample ("no similar case" reference, presence) and the same duplicates found."""
        assert a.trunk_index is not None and a.far_threshold == b.far_threshold
        probe = np.random.default_rng(0).normal(size=(5, a.trunk_index.dim)).astype(np.float32)
        assert np.array_equal(a.trunk_index.search(probe, 3)[1], b.trunk_index.search(probe, 3)[1])
        assert (a.presence is None) == (b.presence is None)  # these scans all show a tumor: none fitted
        if a.presence is not None:
            assert np.allclose(a.presence.proba_no_tumor(probe), b.presence.proba_no_tumor(probe))
        for name in names:
            assert a.duplicate_index.find(images[name]) == b.duplicate_index.find(images[name]), name

    from_table = view(from_file=False)
    arch = CaseArchive.open(archive, sha)
    start_file.write(arch)
    arch.close()
    from_file = view(from_file=True)
    names = list(images)[:12]
    same(from_file, from_table, names)
    assert all(from_file.duplicate_index.find(images[n]) for n in names)  # each scan finds its own case

    # a case added since the file: found among the prints (joined from the table), the file kept
    monkeypatch.setattr(start_file, "START_FILE_FROM", 1)
    extra = tmp_path / "extra"
    extra.mkdir()
    new_name = sorted(scans.glob("scan_*.jpg"))[0].name
    mirrored = np.ascontiguousarray(images[new_name][:, ::-1])
    from PIL import Image

    Image.fromarray(np.clip(mirrored, 0, 255).astype(np.uint8)).save(extra / "flipped.png")
    (extra / "cases.csv").write_text("file,label\nflipped.png,glioma\n")
    before = path.stat().st_mtime_ns
    arch = CaseArchive.open(archive, sha)
    assert add_folder(arch, scan_folder(extra), load_model(small_run).embed, keep_duplicates=True)["added"] == 1
    new_id = int(arch.db.execute("SELECT MAX(id) FROM cases").fetchone()[0])
    arch.close()
    assert path.stat().st_mtime_ns == before  # one case more: the file still describes the archive
    grown = view(from_file=True)
    assert new_id in {d.case_id for d in grown.duplicate_index.find(mirrored)}

    # a removal: the writer remakes the file; a copy of the old one put back is passed over
    stale = tmp_path / "stale.npz"
    shutil.copy(path, stale)
    removed = grown.duplicate_index.find(images[names[0]])[0].case_id
    arch = CaseArchive.open(archive, sha)
    arch.delete([removed])
    arch.close()
    assert path.stat().st_mtime_ns != before
    remade = view(from_file=True)
    assert removed not in {d.case_id for d in remade.duplicate_index.find(images[names[0]])}
    shutil.copy(stale, path)
    passed_over = view(from_file=False)
    same(passed_over, remade, names)
    path.write_bytes(stale.read_bytes()[:1000])  # cut short
    view(from_file=False)
