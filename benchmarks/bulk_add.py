"""Bulk indexing throughput: `neurocbir add` on a folder of scans, CNN included.

    .venv/bin/python benchmarks/bulk_add.py [--run runs/bench/supcon-fold5] [--limit N] [--store flat]

Adds the bundled dataset's JPEGs (all 3064 unless --limit) to a fresh archive in a temporary
folder with the same code as the CLI, then runs the add again (everything already there) to
time a resume. Reports images per second, and how much of the time the CNN and the duplicate check
(each scan against the archive and the scans added before it: `neurocbir.retrieval.ingest.DuplicateCheck`)
took.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from results_doc import machine, write_section

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "bench" / "supcon-fold5")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--store", default="flat")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    from neurocbir.data.cases import default_data_dir
    from neurocbir.models.inference import load_model
    from neurocbir.retrieval.archive import CaseArchive
    from neurocbir.retrieval.casefiles import scan_folder
    from neurocbir.retrieval.ingest import DuplicateCheck, add_folder

    model = load_model(args.run)
    files = scan_folder(default_data_dir())[: args.limit]
    cnn = [0.0]

    def embed(images):
        t = time.perf_counter()
        out = model.embed(images)
        cnn[0] += time.perf_counter() - t
        return out

    checking, split = [0.0], DuplicateCheck.split

    def timed_split(self, *a, **kw):
        t = time.perf_counter()
        try:
            return split(self, *a, **kw)
        finally:
            checking[0] += time.perf_counter() - t

    DuplicateCheck.split = timed_split
    t = time.perf_counter()
    model.embed([files[0].pixels()])  # the first call compiles the network (OpenVINO): timed apart
    warmup = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        arch = CaseArchive.create(Path(tmp) / "archive", model.embedding_dim, model.checkpoint_sha256, store=args.store)
        t = time.perf_counter()
        out = add_folder(arch, files, embed, args.batch_size)
        total = time.perf_counter() - t
        t = time.perf_counter()
        again = add_folder(arch, files, embed, args.batch_size)
        resume = time.perf_counter() - t
        check = arch.check()
        arch.close()
    assert out["added"] == check["indexed"] == check["store_count"] and again["added"] == 0, (out, again, check)
    n = out["added"]
    body = "\n".join(
        [
            "## Bulk indexing throughput: `neurocbir add` on a folder of scans (issue 5)",
            "",
            f"Command: `python benchmarks/bulk_add.py {' '.join(sys.argv[1:])}` | machine: {machine()} | "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | run {args.run.name} (trial {model.trial}), "
            f"{args.store} store, batches of {args.batch_size}; before the timed add, the model's first call "
            f"(which compiles the network for the CPU, once per process) took {warmup:.1f} s",
            "",
            "| scans | total s | images/s | CNN s (share) | duplicate check s (share) | other s (read, decode, hash, "
            "SQLite, index) | rerun with all present s |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {n} | {total:.1f} | {n / total:.1f} | {cnn[0]:.1f} ({cnn[0] / total:.0%}) | {checking[0]:.1f} "
            f"({checking[0] / total:.0%}) | {total - cnn[0] - checking[0]:.1f} | {resume:.1f} |",
        ]
    )
    write_section("bulk", body)
    print(body)


if __name__ == "__main__":
    main()
