"""Latency of POST /query (image -> prediction + top-5) on this machine, over loopback.

    .venv/bin/python benchmarks/query_latency.py [--run runs/bench/supcon-fold5] [--n 200]

Starts the real app (uvicorn) in this process, sends N sequential requests with real test-fold
JPEGs, and writes p50 / p95 (and the in-process time of the service alone) to docs/results.md.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

from results_doc import machine, write_section

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "bench" / "supcon-fold5")
    p.add_argument("--n", type=int, default=200)
    args = p.parse_args()
    import httpx
    import uvicorn

    from neurocbir.app import create_app
    from neurocbir.service import RetrievalService
    from neurocbir.uploads import read_scan

    svc = RetrievalService.from_run(args.run)
    table = svc.cases.table
    files = [table.loader.image_path(int(table.idx[r])).read_bytes() for r in svc.cases.example_rows[: args.n]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(svc), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    http, inproc = [], []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
        for i in range(args.n + 10):
            data = files[i % len(files)]
            t = time.perf_counter()
            r = c.post("/query?k=5", files={"file": ("q.jpg", data, "image/jpeg")})
            dt = time.perf_counter() - t
            r.raise_for_status()
            if i >= 10:  # warm-up excluded
                http.append(dt * 1000)
    for i in range(min(args.n, 100)):
        t = time.perf_counter()
        svc.query(read_scan(files[i % len(files)], "q.jpg"), k=5)
        inproc.append((time.perf_counter() - t) * 1000)
    server.should_exit = True
    h, s = np.array(http), np.array(inproc)
    body = "\n".join(
        [
            "## Query latency: POST /query, image -> prediction + top-5 (issue 4)",
            "",
            f"Command: `python benchmarks/query_latency.py {' '.join(sys.argv[1:])}` | machine: {machine()} | "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | run {args.run.name}, trial {svc.trial}, "
            f"{svc.archive_size} archive cases | {len(h)} sequential requests with 512x512 test-fold JPEGs after 10 warm-up",
            "",
            "| path | p50 (ms) | p95 (ms) | mean (ms) |",
            "|---|---|---|---|",
            f"| HTTP POST /query over loopback | {np.percentile(h, 50):.1f} | {np.percentile(h, 95):.1f} | {h.mean():.1f} |",
            f"| service.query in process (decode + CNN + search + NIR) | {np.percentile(s, 50):.1f} | {np.percentile(s, 95):.1f} | {s.mean():.1f} |",
        ]
    )
    write_section("latency", body)
    print(body)


if __name__ == "__main__":
    main()
