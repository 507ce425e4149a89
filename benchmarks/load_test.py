"""Load: N concurrent clients POST /query for a fixed time against a real `neurocbir serve`
process on loopback: throughput, p50 / p95 / p99, errors, and the server's memory.

    .venv/bin/python benchmarks/load_test.py [--run runs/bench/supcon-fold5] [--archive DIR]
                                             [--clients 1 4 16] [--duration 60]

Each client is a thread with its own HTTP connection sending real test-fold JPEGs back to back.
The server's resident memory is sampled every second from /proc; "flat" means that during the
last level it stays within 5% of its value 10 s into that level (more concurrent requests
hold more buffers, so the working set is compared at a fixed load; repeat the last level,
e.g. --clients 1 4 16 16, to see it settle).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from results_doc import machine, write_section

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next((int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:")), float("nan"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def level(base: str, files: list[bytes], clients: int, duration: float, pid: int) -> dict:
    """One load level; the server's RSS is read 10 s in (its working set at this load) and at the end."""
    import httpx

    lat, codes, lock = [], [], threading.Lock()
    stop = time.perf_counter() + duration

    def client(seed: int) -> None:
        i = seed
        with httpx.Client(base_url=base, timeout=60) as c:
            while time.perf_counter() < stop:
                data = files[i % len(files)]
                i += clients
                t = time.perf_counter()
                try:
                    code = c.post("/query?k=5", files={"file": ("q.jpg", data, "image/jpeg")}).status_code
                except httpx.HTTPError:
                    code = -1
                with lock:
                    lat.append((time.perf_counter() - t) * 1000)
                    codes.append(code)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(s,)) for s in range(clients)]
    for t in threads:
        t.start()
    time.sleep(min(10, duration / 2))
    rss_in = rss_mb(pid)
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    rss_out = rss_mb(pid)
    lat = np.array(lat)
    return {
        "clients": clients,
        "requests": len(lat),
        "rps": len(lat) / wall,
        "p50": np.percentile(lat, 50),
        "p95": np.percentile(lat, 95),
        "p99": np.percentile(lat, 99),
        "errors": sum(c != 200 for c in codes),
        "rss_in": rss_in,
        "rss_out": rss_out,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "bench" / "supcon-fold5")
    p.add_argument(
        "--archive", type=Path, default=None, help="serve a case archive (neurocbir add) instead of the run's own"
    )
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--duration", type=float, default=60)
    p.add_argument("--section", default=None, help="results section (default: load, or load-archive with --archive)")
    args = p.parse_args()
    import httpx

    from neurocbir.data.cases import load_cases

    table = load_cases()
    test = np.flatnonzero(table.fold == 5)
    files = [table.loader.image_path(int(table.idx[r])).read_bytes() for r in test[:200]]
    port = free_port()
    cmd = [sys.executable, "-m", "neurocbir.cli", "serve", "--run", str(args.run), "--port", str(port)]
    archive_desc = ""
    if args.archive:
        import sqlite3

        cmd += ["--archive", str(args.archive)]
        with sqlite3.connect(f"file:{args.archive / 'archive.db'}?mode=ro", uri=True) as db:
            store = dict(db.execute("SELECT key, value FROM meta"))["store"]
        archive_desc = f"a `neurocbir add` archive, {store} store"
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                health = httpx.get(base + "/health", timeout=2).json()
                break
            except httpx.HTTPError:
                if server.poll() is not None:
                    sys.exit(f"the server exited: {server.stderr.read()[-2000:]}")
                time.sleep(0.5)
        else:
            sys.exit("the server did not start within 5 minutes")
        memory: list[tuple[float, float]] = []
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                memory.append((time.time(), rss_mb(server.pid)))
                time.sleep(1)

        threading.Thread(target=sample, daemon=True).start()
        level(base, files, 2, 5, server.pid)  # warm-up
        rss_start = rss_mb(server.pid)
        rows = []
        for n in args.clients:
            rows.append(level(base, files, n, args.duration, server.pid))
            r = rows[-1]
            print(
                f"{n:3d} clients: {r['rps']:.1f} req/s, p50 {r['p50']:.0f} ms, p95 {r['p95']:.0f} ms, "
                f"p99 {r['p99']:.0f} ms, errors {r['errors']}, RSS {rss_mb(server.pid):.0f} MB",
                flush=True,
            )
        rss_end = rss_mb(server.pid)
        sampling.set()
        peak = max(m for _, m in memory)
    finally:
        server.terminate()
        server.wait(10)
    last = rows[-1]
    flat = abs(last["rss_out"] - last["rss_in"]) <= 0.05 * last["rss_in"]
    body = "\n".join(
        [
            "## Load: concurrent POST /query clients on loopback"
            + (" over a case archive" if args.archive else "")
            + " (issue 5)",
            "",
            f"Command: `python benchmarks/load_test.py {' '.join(sys.argv[1:])}` | machine: {machine()} | "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | server: `neurocbir serve` ({health['archive_cases']} "
            f"archive cases, {archive_desc if args.archive else 'the run index'}) in its own "
            f"process; clients: threads in the benchmark process on the same 2 cores | {args.duration:.0f} s per level, "
            "each client sends test-fold JPEGs back to back",
            "",
            "| clients | requests | throughput (req/s) | p50 (ms) | p95 (ms) | p99 (ms) | errors | server RSS 10 s in -> end (MB) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            *[
                f"| {r['clients']} | {r['requests']} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} | "
                f"{r['errors']} | {r['rss_in']:.0f} -> {r['rss_out']:.0f} |"
                for r in rows
            ],
            "",
            f"Server memory (RSS): {rss_start:.0f} MB after the warm-up, {rss_end:.0f} MB at the end, peak {peak:.0f} MB. "
            f"During the last level ({last['clients']} clients, {args.duration:.0f} s) it went from {last['rss_in']:.0f} to "
            f"{last['rss_out']:.0f} MB: " + ("flat (within 5%)." if flat else "**not flat** (more than 5% growth)."),
            "The server runs one query's CNN at a time (torch already uses both cores); other requests wait in its "
            "thread pool, and the event loop stays free for /health and static files.",
        ]
    )
    write_section(args.section or ("load-archive" if args.archive else "load"), body)
    print(body)


if __name__ == "__main__":
    main()
