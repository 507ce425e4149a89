"""Latency of POST /query (image -> prediction + top-5) on this machine, over loopback.

    .venv/bin/python benchmarks/query_latency.py [--run models/lesion-fold5 runs/bench/supcon-fold5] [--n 200]
        [--demo-archive]

Starts the real app (uvicorn) for each run in this process and sends N sequential requests
with real test-fold JPEGs (the first run's test fold) to each, interleaved in rounds (this machine's speed drifts, so runs
are compared within one invocation); writes p50 / p95 (and the in-process time of the service
alone) to docs/results.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from results_doc import machine, serve_in_thread, write_section

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, nargs="+", default=[ROOT / "models" / "lesion-fold5"])
    p.add_argument("--n", type=int, default=200, help="requests per run")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument(
        "--demo-archive",
        action="store_true",
        help="serve each run over its demo archive (what `make demo` serves) instead of its own index",
    )
    args = p.parse_args()
    import httpx

    from neurocbir.app.api import create_app
    from neurocbir.data.cases import load_cases
    from neurocbir.data.uploads import read_scan
    from neurocbir.serving.demo import demo_archive
    from neurocbir.serving.service import RetrievalService

    if args.demo_archive:
        services = [RetrievalService.from_archive(r, demo_archive(r)) for r in args.run]
    else:
        services = [RetrievalService.from_run(r) for r in args.run]
    table = load_cases()
    test = np.flatnonzero(table.fold == services[0].model.config.fold)  # the first run's test fold
    files = [table.loader.image_path(int(table.idx[r])).read_bytes() for r in test[: args.n]]
    servers = [serve_in_thread(create_app(s)) for s in services]
    http = {r: [] for r in args.run}
    inproc = {r: [] for r in args.run}
    per_round = max(1, args.n // args.rounds)
    for rnd in range(args.rounds):
        for run, svc, (url, _) in zip(args.run, services, servers):
            with httpx.Client(base_url=url, timeout=30) as c:
                for i in range(per_round + 10):
                    data = files[(rnd * per_round + i) % len(files)]
                    t = time.perf_counter()
                    r = c.post("/query?k=5", files={"file": ("q.jpg", data, "image/jpeg")})
                    dt = time.perf_counter() - t
                    r.raise_for_status()
                    if i >= 10:  # warm-up excluded
                        http[run].append(dt * 1000)
            for i in range(per_round // 2):
                t = time.perf_counter()
                svc.query(read_scan(files[(rnd * per_round + i) % len(files)], "q.jpg"), k=5)
                inproc[run].append((time.perf_counter() - t) * 1000)
    for _, server in servers:
        server.should_exit = True
    rows = []
    for run, svc in zip(args.run, services):
        h, s = np.array(http[run]), np.array(inproc[run])
        rows += [
            f"| {run.name} ({svc.model.config.recipe}, {svc.model.config.image_size} px) | HTTP POST /query over loopback "
            f"| {np.percentile(h, 50):.1f} | {np.percentile(h, 95):.1f} | {h.mean():.1f} |",
            f"| {run.name} | service.query in process (decode + CNN + outline + search + NIR) "
            f"| {np.percentile(s, 50):.1f} | {np.percentile(s, 95):.1f} | {s.mean():.1f} |",
        ]
    body = "\n".join(
        [
            "## Query latency: POST /query, image -> prediction + top-5 (issues 4, 9)"
            if not args.demo_archive
            else "## Query latency over the demo archive: what `make demo` serves (issues 39, 41)",
            "",
            f"Command: `python benchmarks/query_latency.py {' '.join(sys.argv[1:])}` | machine: {machine()} | "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {services[0].archive_size} archive cases "
            f"({'the demo archive' if args.demo_archive else 'the run index'}) | "
            f"{len(http[args.run[0]])} sequential requests per run with 512x512 test-fold JPEGs, runs interleaved in "
            f"{args.rounds} rounds (10 warm-up requests per round excluded)",
            "",
            "| run | path | p50 (ms) | p95 (ms) | mean (ms) |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    write_section("latency-demo-archive" if args.demo_archive else "latency", body)
    print(body)


if __name__ == "__main__":
    main()
