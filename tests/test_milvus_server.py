"""The archive on a real Milvus server, and the faults on the way to it: the server killed during
`neurocbir add` and restarted (every case once, in SQLite and in the collection), `add` meeting a
server that is not ready yet (it waits, boundedly, and says so), the server down while the app
serves (503 with the reason, then served again with no restart of the app), archives on one
server kept apart, and two writers with a reader at once.

The tests share one server (the embedded server fixes two of its ports: one at a time per machine)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from neurocbir.retrieval.archive import CaseArchive


@pytest.fixture
def server(milvus_server):
    """The session's server, which this test may kill and start again; running again after it."""
    yield milvus_server
    if not milvus_server.running():
        milvus_server.start()


def _add(folder, archive, run, uri, *extra) -> list[str]:
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
        "--store",
        "milvus",
        "--milvus-uri",
        uri,
        "--keep-duplicates",
        *extra,
    ]  # fmt: skip (counts, not duplicates)


def _same_in_sqlite_and_milvus(archive) -> int:
    arch = CaseArchive.open(archive)
    ids, _ = arch.embeddings()
    check = arch.check()
    assert check["duplicates"] == 0 and check["states"] == {"indexed": len(ids)}
    assert arch.store.count() == len(ids) and arch.store.contains(ids).all()
    assert arch.store.ids().tolist() == sorted(ids.tolist())  # the same ids, each once
    arch.close()
    return len(ids)


def _wait_for_cases(archive, proc, wait_s: float = 300) -> None:
    """Until the archive being added to holds a case (read-only reads of its database)."""
    import sqlite3

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and proc.poll() is None:
        if (archive / "archive.db").is_file():
            try:
                db = sqlite3.connect(f"file:{archive / 'archive.db'}?mode=ro", uri=True, timeout=1)
                n = db.execute("SELECT COUNT(*) FROM cases").fetchone()[0]
                db.close()
                if n:
                    return
            except sqlite3.OperationalError:
                pass  # the schema is being made
        time.sleep(0.1)
    raise AssertionError(f"no case was added (add exited with {proc.poll()})")


def test_the_server_down_while_add_writes_and_the_app_serves(
    server, small_data_dir, small_run, small_cases, tmp_path, test_seed
):
    """One crash of the server (a restart takes a minute): an `add` it kills mid-way loses and
    duplicates nothing once run again; the app says why it cannot answer (503), then answers again
    with no restart; an `add` meeting the server down refuses after a short wait, or waits, says
    so and finishes once the server is back."""
    from neurocbir.app.api import create_app
    from neurocbir.data.cases import load_cases
    from neurocbir.serving.service import RetrievalService

    served = tmp_path / "served"
    subprocess.run(_add(small_data_dir, served, small_run, server.uri, "--fold", "1", "--fold", "2"), check=True, capture_output=True, timeout=600)  # fmt: skip
    client = TestClient(create_app(RetrievalService.from_archive(small_run, served)))
    scan = (small_cases.loader.root / "images" / f"{int(small_cases.idx[0])}.jpg").read_bytes()
    assert client.get("/health").status_code == 200
    assert client.post("/query", files={"file": ("s.jpg", scan)}).status_code == 200

    archive = tmp_path / "archive"
    proc = subprocess.Popen(_add(small_data_dir, archive, small_run, server.uri, "--batch-size", "4", "--index-every", "0"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for_cases(archive, proc)  # the event: its first batch is committed (model load first)
    time.sleep(np.random.default_rng(test_seed).uniform(0, 2))  # the kill lands somewhere mid-add
    assert proc.poll() is None, "the add ended before the server was killed"
    server.kill()
    health = client.get("/health")
    assert health.status_code == 503 and "Milvus server" in health.json()["archive_problem"]
    down = client.post("/query", files={"file": ("s.jpg", scan)})
    assert down.status_code == 503 and "Milvus server" in down.json()["detail"]
    try:
        proc.communicate(timeout=120)  # the add fails (or waits, then fails) without its server
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()

    refused = subprocess.run(_add(small_data_dir, tmp_path / "other", small_run, server.uri, "--milvus-wait", "2"),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert refused.returncode == 2 and "after waiting 2 s" in refused.stderr and "Traceback" not in refused.stderr
    waiting = subprocess.Popen(_add(small_data_dir, tmp_path / "late", small_run, server.uri, "--fold", "3", "--milvus-wait", "400"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    said = []
    for line in waiting.stdout:  # the event: it says that it waits (model load first)
        said.append(line)
        if "is not ready yet: waiting up to 400 s" in line:
            break
    assert waiting.poll() is None, "".join(said)[-2000:]  # it said so, and it is still waiting
    server.start()
    out, _ = waiting.communicate(timeout=600)
    out = "".join(said) + out
    assert waiting.returncode == 0, out[-2000:]
    assert "is not ready yet: waiting up to 400 s" in out and "cases added" in out
    for _ in range(60):  # the client reconnects by itself: no restart of the app
        if client.get("/health").status_code == 200:
            break
        time.sleep(1)
    assert client.get("/health").json()["archive_problem"] is None
    assert client.post("/query", files={"file": ("s.jpg", scan)}).status_code == 200

    done = subprocess.run(
        _add(small_data_dir, archive, small_run, server.uri), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert _same_in_sqlite_and_milvus(archive) == len(load_cases(small_data_dir))


def test_archives_on_one_server_are_apart_and_writers_run_together(
    milvus_server, small_data_dir, small_run, small_cases, tmp_path
):
    """Two `add` processes into two archives on one server while the app serves a third: all
    finish, no errors, and each archive sees only its own cases."""
    from neurocbir.serving.service import RetrievalService

    uri = milvus_server.uri
    subprocess.run(_add(small_data_dir, tmp_path / "c", small_run, uri, "--fold", "5"), check=True, capture_output=True, timeout=600)  # fmt: skip
    svc = RetrievalService.from_archive(small_run, tmp_path / "c")
    errors, answers = [], []
    stop = threading.Event()

    def read():
        scan = small_cases.load_image(0)
        while not stop.is_set():
            try:
                answers.append(svc.query(scan)["retrievals"][0]["case_id"])
            except Exception as exc:  # noqa: BLE001 - any error is a failure of this test
                errors.append(repr(exc))

    reader = threading.Thread(target=read)
    reader.start()
    writers = [subprocess.Popen(_add(small_data_dir, tmp_path / name, small_run, uri, "--fold", fold), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for name, fold in (("a", "1"), ("b", "2"))]  # fmt: skip
    codes = [w.wait(600) for w in writers]
    stop.set()
    reader.join(60)
    assert codes == [0, 0], [w.stderr.read()[-1000:] for w in writers]
    assert not errors and answers
    sizes = {name: _same_in_sqlite_and_milvus(tmp_path / name) for name in "abc"}
    for name, fold in (("a", 1), ("b", 2), ("c", 5)):
        assert sizes[name] == int((small_cases.fold == fold).sum())
    collections = {CaseArchive.open(tmp_path / n, writer=False).meta["milvus_collection"] for n in "abc"}
    assert len(collections) == 3
