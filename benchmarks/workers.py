"""What a second worker process costs and gives (issue 41): `neurocbir serve --workers 1` and
`--workers 2` over the same archive, one after the other in one run, each under 1 and 4
concurrent clients sending fold-5 JPEGs back to back over loopback.

    .venv/bin/python benchmarks/workers.py [--run models/lesion-fold5] [--archive DIR] [--duration 30]

Reported per worker count and load: throughput, p50 / p95, errors, and the resident memory of the
server's whole process tree (every worker holds its own model and archive view). Clients run in
this process, on the same 2 cores as the server.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from load_test import free_port, level
from results_doc import machine, write_section

ROOT = Path(__file__).resolve().parents[1]


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (MB)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text().splitlines()
            total += next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total


def serve(run: Path, archive: Path | None, workers: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "neurocbir.cli", "serve", "--run", str(run), "--port", str(port)]
    cmd += ["--workers", str(workers)] + (["--archive", str(archive)] if archive else [])
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base, seen = f"http://127.0.0.1:{port}", set()
    for _ in range(1200):  # until every worker has answered
        try:
            seen.add(httpx.get(base + "/health", timeout=5).json()["worker"])
            if len(seen) == workers:
                return server, base
        except httpx.HTTPError:
            if server.poll() is not None:
                sys.exit(f"the server exited: {server.stderr.read()[-2000:]}")
            time.sleep(0.5)
    sys.exit("the server's workers did not all start within 10 minutes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "models" / "lesion-fold5")
    ap.add_argument("--archive", type=Path, default=ROOT / "models" / "lesion-fold5" / "demo-archive")
    ap.add_argument("--duration", type=float, default=30)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    args = ap.parse_args()
    from neurocbir.data.cases import load_cases

    table = load_cases()
    files = [table.loader.image_path(int(table.idx[r])).read_bytes() for r in np.flatnonzero(table.fold == 5)[:200]]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = []
    for workers in (1, 2):
        server, base = serve(args.run, args.archive, workers)
        try:
            level(base, files, 2, 5, server.pid)  # warm-up
            for n in args.clients:
                r = level(base, files, n, args.duration, server.pid)
                r.update(workers=workers, rss=tree_rss_mb(server.pid))
                rows.append(r)
                print(f"{workers} worker(s), {n} clients: {r['rps']:.1f} req/s, p50 {r['p50']:.0f} ms", flush=True)
        finally:
            server.terminate()
            server.wait(60)
    body = "\n".join(
        [
            "## Several worker processes: what a second one costs and gives (issue 41)",
            "",
            f"Machine: {machine()}; {started}; `neurocbir serve --workers N` over `{args.archive}`, "
            f"{args.duration:.0f} s per level; clients are threads of the benchmark on the same 2 cores.",
            "",
            "| workers | clients | requests | throughput (req/s) | p50 (ms) | p95 (ms) | errors | server RSS, all processes (MB) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            *[
                f"| {r['workers']} | {r['clients']} | {r['requests']} | {r['rps']:.1f} | {r['p50']:.0f} | "
                f"{r['p95']:.0f} | {r['errors']} | {r['rss']:.0f} |"
                for r in rows
            ],
            "",
            f"`.venv/bin/python benchmarks/workers.py {' '.join(sys.argv[1:])}`",
        ]
    )
    write_section("workers", body)
    print(body)


if __name__ == "__main__":
    main()
