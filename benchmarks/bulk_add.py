"""Bulk indexing throughput: `neurocbir add` on a folder of scans, CNN included.

    .venv/bin/python benchmarks/bulk_add.py [--run runs/bench/supcon-fold5] [--limit N] [--store flat]

Adds the bundled dataset's JPEGs (all 3064 unless --limit) to a fresh archive in a temporary
folder with the same code as the CLI, then runs the add again (everything already there) to
time a resume. Reports images per second, and how much of the time the CNN and the duplicate check
(each scan against the archive and the scans added before it: `neurocbir.retrieval.ingest.DuplicateCheck`)
took. Then the duplicate check's thread setting (`DuplicateCheck.split` runs FAISS's and numpy's
small products on one thread) against the threads as the process has them, on the first
``--compare`` scans, adds interleaved in rounds.
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
    p.add_argument("--compare", type=int, default=800, help="scans of each add comparing thread settings")
    p.add_argument("--rounds", type=int, default=2)
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

    checking = [0.0]
    DuplicateCheck.split = _timed(DuplicateCheck.split, checking)
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
    body += "\n\n" + compare_threads(model, files[: args.compare], embed, args, checking, cnn)
    write_section("bulk", body)
    print(body)


def compare_threads(model, files, embed, args, checking, cnn) -> str:
    """Adds of ``files`` to fresh archives, the check on one thread (the app's) and on the
    process's threads, interleaved; a table of each round's seconds."""
    from neurocbir.retrieval.archive import CaseArchive
    from neurocbir.retrieval.ingest import DuplicateCheck, add_folder

    timed_split, ways = DuplicateCheck.split, {}  # main's timer around the app's split

    def process_threads(self, batch, images, remember=True):
        return DuplicateCheck._split(self, batch, images, remember)

    splits = (("one thread (the app's)", timed_split), ("as the process has them", _timed(process_threads, checking)))
    for _ in range(args.rounds):
        for name, split in splits:
            DuplicateCheck.split = split
            checking[0] = cnn[0] = 0.0
            with tempfile.TemporaryDirectory() as tmp:
                arch = CaseArchive.create(
                    Path(tmp) / "a", model.embedding_dim, model.checkpoint_sha256, store=args.store
                )
                t = time.perf_counter()
                add_folder(arch, files, embed, args.batch_size)
                ways.setdefault(name, []).append((time.perf_counter() - t, checking[0], cnn[0]))
                arch.close()
    DuplicateCheck.split = timed_split
    lines = [
        f"The duplicate check's threads: {len(files)} scans added to a fresh archive each way, {args.rounds} rounds "
        "interleaved (seconds per round).",
        "",
        "| FAISS / numpy threads in the check | total s | duplicate check s | CNN s |",
        "|---|---|---|---|",
    ]
    for name, runs in ways.items():
        cols = (", ".join(f"{run[i]:.1f}" for run in runs) for i in range(3))
        lines.append(f"| {name} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def _timed(split, checking):
    def timed(self, *a, **kw):
        t = time.perf_counter()
        try:
            return split(self, *a, **kw)
        finally:
            checking[0] += time.perf_counter() - t

    return timed


if __name__ == "__main__":
    main()
