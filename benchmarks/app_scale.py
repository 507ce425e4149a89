"""The app itself at scale (issue 41): `neurocbir serve --archive` over a synthetic archive of N
cases, end to end over loopback HTTP: time from start to the first answered query, the server's
resident memory, POST /query p50 / p95 with one client and with 4, errors, and a case added by
`neurocbir add` while serving: how long until a query finds it.

    .venv/bin/python benchmarks/app_scale.py [--sizes 100000] [--store flat|milvus] [--queries 100]

Synthetic cases (as benchmarks/store_scale.py makes them, on the real class manifolds of the served
model): each starts from a real case of the demo archive and carries that case's label, plane,
area, image and report, its embedding moved along its class manifold, its trunk descriptor with a
little noise, and its duplicate-check print moved away from its source's as another slice's would be
(`another_print`: no two are duplicates, and a query is not a copy of them). `--store milvus` starts a
Milvus standalone server (tests/milvus_server.py) for the archive, and the app starts once the
server has indexed every case (the build time includes that wait).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from results_doc import machine, write_section
from store_scale import synthetic
from workers import tree_rss_mb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ALTERED = "again, as an archive made before its start file and indexes"


def build(root: Path, source: Path, n: int, store: str, uri: str | None, seed: int = 0) -> float:
    """An archive of ``n`` synthetic cases made from ``source``'s; returns the seconds it took."""
    from neurocbir.retrieval.archive import CaseArchive, CaseRecord

    t0 = time.time()
    src = CaseArchive.open(source, writer=False)
    rows = src.db.execute(
        "SELECT id, label, plane, area_mm2, image_path, report, embedding, trunk, fingerprint, patient_key "
        "FROM cases WHERE state = 'indexed' ORDER BY id"
    ).fetchall()
    emb = np.stack([np.frombuffer(r[6], np.float32) for r in rows])
    labels = np.array([r[1] for r in rows])
    rng = np.random.default_rng(seed)
    x, origin = synthetic(emb, labels, n, rng, sources=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    meta = src.meta
    arch = CaseArchive.create(
        root, int(meta["dim"]), meta["checkpoint_sha256"], store, uri, meta.get("run", ""), "HNSW" if uri else "FLAT"
    )
    for b in range(0, n, 20_000):
        batch = []
        for i in range(b, min(n, b + 20_000)):
            r = rows[origin[i]]
            trunk = np.frombuffer(r[7], np.float32) * (1 + 0.01 * rng.standard_normal(1280).astype(np.float32))
            fp = another_print(np.frombuffer(r[8], np.float16).astype(np.float32), rng)
            batch.append(
                CaseRecord(
                    f"synthetic-{i}", int(r[1]), f"{r[9]}-{i // 20}", r[2], r[3], r[4], x[i], trunk, None, r[5], fp
                )
            )
        arch.add(batch)
    if uri:
        wait_for_index(arch.store, n)
    arch.close()
    return time.time() - t0


def another_print(fp: np.ndarray, rng: np.random.Generator, similarity=(0.97, 0.9)) -> np.ndarray:
    """A stored print ([coarse, fine], each centred and of unit norm) moved to about ``similarity``
    with the original (coarse, fine), as another slice of the same kind of scan: a query meets
    candidates (coarse prints past the gate) as it does in the demo archive, and no synthetic case
    is a copy of another, nor of a query's source (fine prints far below a duplicate's)."""
    from neurocbir.retrieval.duplicates import SIDE

    out = []
    for part, target in zip((fp[: SIDE * SIDE], fp[SIDE * SIDE :]), similarity):
        sigma = np.sqrt((1 / target**2 - 1) / len(part))  # E[cos] ~ 1 / sqrt(1 + d sigma^2)
        moved = part + sigma * rng.standard_normal(len(part))
        moved -= moved.mean()
        out.append(moved / np.linalg.norm(moved))
    return np.concatenate(out).astype(np.float16)


def wait_for_index(store, n: int, limit_s: float = 1800) -> None:
    """Until the Milvus server has indexed all ``n`` cases (a deployment serves a built index; a
    search before that scans unindexed segments)."""
    store.save()  # flush: sealed segments get their index built
    client, collection = store.client, store.collection
    name = client.list_indexes(collection)[0]
    deadline = time.time() + limit_s
    while time.time() < deadline:
        info = client.describe_index(collection, name)
        if int(info.get("indexed_rows", 0)) >= n and not int(info.get("pending_index_rows", 0)):
            return
        time.sleep(5)
    sys.exit(f"the Milvus server had not indexed {n} cases after {limit_s:.0f} s")


def run_server(run: Path, archive: Path, log: Path) -> tuple[subprocess.Popen, str, float]:
    """The app on a free port, what it says (and any error) written to ``log``."""
    from load_test import free_port

    port = free_port()
    t0 = time.time()
    cmd = [sys.executable, "-m", "neurocbir.cli", "serve", "--run", str(run), "--archive", str(archive)]
    with open(log, "w") as out:
        server = subprocess.Popen(cmd + ["--port", str(port)], stdout=out, stderr=subprocess.STDOUT, text=True)
    server.log = log
    return server, f"http://127.0.0.1:{port}", t0


def load_parts(log: Path) -> str:
    """Where the app's load went, as it said it at start ("loaded in ..."), or what it said last."""
    lines = log.read_text().splitlines()
    said = [line.split("loaded in ", 1)[1] for line in lines if "loaded in " in line]
    return said[-1] if said else (lines[-1] if lines else "nothing said")


def start_once(run: Path, archive: Path, log: Path, scan: bytes) -> tuple[subprocess.Popen, str, float, str]:
    """(the app, its URL, seconds from its start to its first answer, where its load went)."""
    server, base, t0 = run_server(run, archive, log)
    try:
        start_s = first_answer(server, base, t0, scan)
    except BaseException:
        server.kill()
        raise
    return server, base, start_s, load_parts(log)


def as_older_archive(archive: Path) -> None:
    """Remove the start file and drop the indexes the app's start reads from (an archive made
    before them: the app then reads its table, scanning it)."""
    import sqlite3

    from neurocbir.retrieval import start_file
    from neurocbir.retrieval.archive import CaseArchive
    from neurocbir.retrieval.archive_reads import READ_INDEX_NAMES

    (archive / start_file.NAME).unlink(missing_ok=True)  # none under START_FILE_FROM cases
    db = sqlite3.connect(archive / CaseArchive.DB)
    for name in READ_INDEX_NAMES:
        db.execute(f"DROP INDEX {name}")
    db.close()


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(60)


def first_answer(server, base: str, t0: float, scan: bytes, limit_s: float = 600) -> float:
    """Seconds from the app's start to its first answered query; the benchmark stops with the app's
    last answer when none comes within ``limit_s`` (e.g. the Milvus server died: the app answers 503)."""
    import httpx

    last = "no answer"
    while time.time() - t0 < limit_s:
        try:
            r = httpx.post(base + "/query", files={"file": ("q.jpg", scan, "image/jpeg")}, timeout=120)
            if r.status_code == 200:
                return time.time() - t0
            last = f"HTTP {r.status_code}: {r.text[:300]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}"
        if server.poll() is not None:
            sys.exit(f"the server exited: {server.log.read_text()[-2000:]}")
        time.sleep(0.2)
    server.kill()
    sys.exit(f"the app answered no query within {limit_s:.0f} s of its start; its last answer: {last}")


def found_after_add(base: str, archive: Path, run: Path, scan: Path, tmp: Path) -> float:
    """Seconds from `neurocbir add` committing a new scan until a query finds it (distance ~0)."""
    import httpx

    folder = tmp / "late"
    folder.mkdir()
    (folder / "late.jpg").write_bytes(scan.read_bytes())
    (folder / "cases.csv").write_text("file,label\nlate.jpg,glioma\n")
    cmd = [sys.executable, "-m", "neurocbir.cli", "add", str(folder), "--archive", str(archive), "--run", str(run)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    t0 = time.time()
    while time.time() - t0 < 120:
        out = httpx.post(base + "/query?k=1", files={"file": ("q.jpg", scan.read_bytes(), "image/jpeg")}, timeout=120)
        if out.status_code == 200 and out.json()["retrievals"][0]["distance"] < 1e-3:
            return time.time() - t0
    return float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "models" / "lesion-fold5")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    ap.add_argument("--store", choices=("flat", "milvus"), default="flat")
    ap.add_argument("--duration", type=float, default=30)
    ap.add_argument(
        "--restarts",
        type=int,
        default=2,
        help="starts of the app again on each archive, timed (as many again without its start file and indexes)",
    )
    args = ap.parse_args()
    from load_test import level
    from neurocbir.data.cases import load_cases
    from neurocbir.serving.demo import demo_archive

    source = demo_archive(args.run)
    table = load_cases()
    test = np.flatnonzero(table.fold == 5)
    paths = [table.loader.image_path(int(table.idx[r])) for r in test[:200]]
    files = [p.read_bytes() for p in paths]
    started, rows = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), []
    milvus = None
    if args.store == "milvus":
        from tests.milvus_server import MilvusServer

        milvus = MilvusServer(Path(tempfile.mkdtemp(prefix="milvus-")), session_ttl_s=60)
        milvus.start()
    (ROOT / "cache").mkdir(exist_ok=True)  # on the checkout's disk: a million cases outgrow a small /tmp
    try:
        for n in args.sizes:
            with tempfile.TemporaryDirectory(dir=ROOT / "cache") as tmp:
                archive = Path(tmp) / "archive"
                built = build(archive, source, n, args.store, milvus.uri if milvus else None)
                print(f"{n} cases built in {built:.0f} s", flush=True)
                server, base, start_s, parts = start_once(args.run, archive, Path(tmp) / "serve.log", files[0])
                try:
                    one = level(base, files, 1, args.duration, server.pid)
                    four = level(base, files, 4, args.duration, server.pid)
                    # the most of every sample (each level's start and end, and now): not only the last
                    rss = max(tree_rss_mb(server.pid), *(x[k] for x in (one, four) for k in ("rss_in", "rss_out")))
                    added = found_after_add(base, archive, args.run, paths[-1], Path(tmp))
                finally:
                    stop(server)
                starts = [("first", start_s, parts)]
                for again in ("again", ALTERED):  # a slow start: the archive's or the moment's?
                    if again != "again":  # as an archive made before them (the app then scans the table)
                        as_older_archive(archive)
                    for _ in range(args.restarts):
                        server, _, seconds, parts = start_once(args.run, archive, Path(tmp) / "serve.log", files[0])
                        stop(server)
                        starts.append((again, seconds, parts))
                        print(f"started {again}: first answer after {seconds:.0f} s; loaded in {parts}", flush=True)
                rows.append(dict(n=n, starts=starts, one=one, four=four, rss=rss, added=added, built=built))
                print(rows[-1], flush=True)
    finally:
        if milvus is not None:
            milvus.stop()
    body = "\n".join(
        [
            "## The app at scale: `neurocbir serve` over a large archive (issue 41)",
            "",
            f"Machine: {machine()}; {started}; `neurocbir serve --archive` over synthetic archives ({args.store} store) "
            f"made from the demo archive's cases; {args.duration:.0f} s per load level, clients on the same 2 cores.",
            "",
            "| cases | start to first answer (s); started again; again without the start file and indexes | RSS, most sampled (MB) | 1 client p50 / p95 (ms) | 4 clients p95 (ms), errors "
            "| added case found after (s) |",
            "|---:|---:|---:|---:|---:|---:|",
            *[
                f"| {r['n']:,} | {r['starts'][0][1]:.0f}; "
                + "; ".join(
                    ", ".join(f"{s:.0f}" for w, s, _ in r["starts"] if w == kind) for kind in ("again", ALTERED)
                )
                + f" | {r['rss']:.0f} | {r['one']['p50']:.0f} / {r['one']['p95']:.0f} | "
                f"{r['four']['p95']:.0f}, {r['four']['errors']} | {r['added']:.1f} |"
                for r in rows
            ],
            "",
            "Each archive is served once (the load levels, the added case), then started again on the same "
            f"archive {args.restarts} times, then {args.restarts} more times without the start file and the indexes "
            "the start reads from (removed and dropped: as an archive made before them, whose table the app then "
            "reads, scanning it). The writer keeps the start file for an archive of 50,000 cases or more "
            "(`neurocbir.retrieval.start_file`); the build's time includes writing it. Where each start's "
            "seconds went, as the app says it when it has loaded (the rest of a start: Python's imports, the "
            "web server, the first query):",
            "",
            *[
                f"- {r['n']:,} cases, start {i + 1} ({kind}): {s:.0f} s; loaded in {parts}"
                for r in rows
                for i, (kind, s, parts) in enumerate(r["starts"])
            ],
            "",
            f"`.venv/bin/python benchmarks/app_scale.py {' '.join(sys.argv[1:])}`",
        ]
    )
    write_section(f"app-scale-{args.store}", body)
    print(body)


if __name__ == "__main__":
    main()
