"""What one query costs, part by part (issue 41), and what each way of answering it faster gives:
the app's query service in process over the demo archive and over synthetic archives of N cases
(as benchmarks/app_scale.py makes them; `--store milvus`: on a Milvus standalone server).

    .venv/bin/python benchmarks/query_stages.py [--sizes 0 100000] [--store flat|milvus] [--queries 60]

Size 0 is the demo archive itself (flat). Fold-5 test slices are the queries (never in the
archive). Each archive is queried the app's way and, the same queries interleaved in rounds (each
round begun by another way), with one of its choices undone:
- "OpenMP as the process has it": the query's thread keeps the process's OpenMP threads (two
  here) instead of one (`neurocbir.serving.threads.one_thread`);
- "NIR by doubling the depth": the deep search doubles its depth over every partition instead of
  searching each label's partitions (`neurocbir.retrieval.store._by_label`);
- "NIR in two rounds": each label's 64 nearest, then a range search of the nearest label's
  partitions, instead of each label's nearest to the calibration's depth at once
  (`neurocbir.retrieval.store.ONE_ROUND_MAX`);
- "server calls one after another" (Milvus only): the labels' searches, and the search beside the
  "no similar case" check, wait for each other;
- "tumor presence after the server's search" (Milvus only): the slice's presence (its descriptor's
  P(no tumor)) decided once the server has answered, instead of while it searches
  (`neurocbir.serving.service.PRESENCE_BESIDE_SEARCH`);
- "BLAS threads as the process has them": numpy's OpenBLAS on every core instead of one
  (`neurocbir.serving.threads.one_blas_thread`);
- "the duplicate check before the CNN": the scan's check against the archive's prints runs on
  the query's thread before the CNN instead of on another thread while the CNN runs
  (`neurocbir.serving.service._own_cases`);
- "the network of any batch size": the CNN compiled for batches of any size only, instead of also
  for the query's own (`neurocbir.models.cpu_runtime.FIXED_BATCHES`);
- "no similar case over float32": the trunk descriptors held as float32 instead of float16; its
  nearest distances and flags are compared with the app's;
- "the scan alone (no mirror)" (a run whose `mirror.json` chose the mirror): the query embedded
  from one view instead of two; what it costs, and how many answers it changes (the archive still
  holds both views' means: its answers are not the run's other choice, only the mirror's cost).
The parts are timed where the service calls them (the duplicate check runs beside the CNN, and
the NIR search beside the "no similar case" check on a server, so the parts add up to more than
the whole).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from results_doc import machine, write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PARTS = ("analyse", "neighbours", "duplicates_of", "nearest_trunk", "tumor_presence")


class _AsTheProcessHasIt:
    def limit(self, **_):
        return contextlib.nullcontext()


def timed(obj, name: str, into: dict, recording: dict) -> None:
    """Time ``obj.name`` into ``into[name]`` while ``recording["on"]``."""
    fn = getattr(obj, name)

    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            if recording["on"]:
                into.setdefault(name, []).append(1000 * (time.perf_counter() - t))

    setattr(obj, name, wrapper)


class _CheckFirst:
    """A pool that runs the scan's duplicate check at once, on the calling thread (before the CNN),
    and hands everything else to ``pool``."""

    def __init__(self, pool):
        self.pool = pool

    def submit(self, fn, *args, **kwargs):
        from concurrent.futures import Future

        import neurocbir.serving.service as service

        if fn is not service._own_cases:
            return self.pool.submit(fn, *args, **kwargs)
        done = Future()
        done.set_result(fn(*args, **kwargs))
        return done


def variants(svc, remote: bool) -> dict:
    """name -> (enter, leave): each undoes one of the app's choices while it is entered."""
    import neurocbir.models.cpu_runtime as runtime
    import neurocbir.retrieval.store as store_module
    import neurocbir.serving.service as service
    import neurocbir.serving.threads as threads
    from neurocbir.retrieval.index import VectorIndex
    from neurocbir.retrieval.start_file import TRUNK_SAMPLE

    by_label, threads_of, one_round = store_module._by_label, threads._threads, store_module.ONE_ROUND_MAX
    fixed = runtime.FIXED_BATCHES
    half = svc.cases.trunk_index
    sample = svc.cases.archive.trunk_sample(TRUNK_SAMPLE)
    full = VectorIndex.build(sample["trunk"]) if sample is not None else None
    out = {
        "the app": (lambda: None, lambda: None),
        "OpenMP as the process has it": (
            lambda: setattr(threads, "_threads", _AsTheProcessHasIt),
            lambda: setattr(threads, "_threads", threads_of),
        ),
        "NIR by doubling the depth": (
            lambda: setattr(store_module, "_by_label", lambda *a: None),
            lambda: setattr(store_module, "_by_label", by_label),
        ),
        "NIR in two rounds": (
            lambda: setattr(store_module, "ONE_ROUND_MAX", 0),
            lambda: setattr(store_module, "ONE_ROUND_MAX", one_round),
        ),
        "BLAS threads as the process has them": (
            lambda: threads._threads().select(prefix="libscipy_openblas").limit(limits=os.cpu_count()),
            lambda: threads.one_blas_thread.__wrapped__(),
        ),
        "the duplicate check before the CNN": (
            lambda: setattr(service, "side_work", lambda: _CheckFirst(threads.side_work())),
            lambda: setattr(service, "side_work", threads.side_work),
        ),
        "the network of any batch size": (
            lambda: setattr(runtime, "FIXED_BATCHES", ()),
            lambda: setattr(runtime, "FIXED_BATCHES", fixed),
        ),
        "no similar case over float32": (
            lambda: setattr(svc.cases, "trunk_index", full),
            lambda: setattr(svc.cases, "trunk_index", half),
        ),
    }
    if getattr(svc.model, "mirror", False):
        out["the scan alone (no mirror)"] = (
            lambda: setattr(svc.model, "mirror", False),
            lambda: setattr(svc.model, "mirror", True),
        )
    if remote:
        store = svc.cases.store
        out["server calls one after another"] = (
            lambda: setattr(store, "remote", False),
            lambda: store.__dict__.pop("remote", None),
        )
        out["tumor presence after the server's search"] = (
            lambda: setattr(service, "PRESENCE_BESIDE_SEARCH", False),
            lambda: setattr(service, "PRESENCE_BESIDE_SEARCH", True),
        )
    return out


def measure(svc, images: list, rounds: int, remote: bool) -> dict:
    """Each way's query times and answers (the same images in the same order), and the app's parts."""
    ways = variants(svc, remote)
    times, answers = {w: [] for w in ways}, {w: [] for w in ways}
    parts: dict[str, list] = {}
    recording = {"on": False}
    for part in PARTS:
        timed(svc.cases if part != "analyse" else svc, part, parts, recording)
    for im in images[:5]:  # warm-up
        svc.query(im, k=5)
    per = int(np.ceil(len(images) / rounds))
    names = list(ways)
    for r in range(rounds):  # each round begins with another way: none always comes first
        for way in names[r % len(names) :] + names[: r % len(names)]:
            enter, leave = ways[way]
            enter()
            recording["on"] = way == "the app"
            try:
                for im in images[r * per : (r + 1) * per]:
                    t = time.perf_counter()
                    answers[way].append(svc.query(im, k=5))
                    times[way].append(1000 * (time.perf_counter() - t))
            finally:
                leave()
                recording["on"] = False
    return {"times": times, "parts": parts, "answers": answers}


def archives(sizes: list[int], store: str, run: Path):
    """(label, archive folder) for each size, built (and removed) as it is reached."""
    from app_scale import build
    from neurocbir.serving.demo import demo_archive

    source = demo_archive(run)
    milvus = None
    if store == "milvus":
        from tests.milvus_server import MilvusServer

        milvus = MilvusServer(Path(tempfile.mkdtemp(prefix="milvus-", dir=ROOT / "cache")), session_ttl_s=60)
        milvus.start()
    try:
        for n in sizes:
            if n == 0:
                yield "demo archive", source
                continue
            with tempfile.TemporaryDirectory(dir=ROOT / "cache") as tmp:
                archive = Path(tmp) / "archive"
                built = build(archive, source, n, store, milvus.uri if milvus else None)
                print(f"{n} cases built in {built:.0f} s", flush=True)
                yield f"{n:,} cases ({store})", archive
    finally:
        if milvus is not None:
            milvus.stop()


def agreement(res: dict) -> list[str]:
    """Each way's answers against the app's, query by query (the same images in the same order)."""
    app = res["answers"]["the app"]
    lines = []
    for way, answers in res["answers"].items():
        if way == "the app":
            continue
        pairs = list(zip(app, answers))
        same = sum(a["prediction"] == b["prediction"] and a["tumor_found"] == b["tumor_found"] for a, b in pairs)
        conf = [abs(a["confidence"] - b["confidence"]) for a, b in pairs if a["confidence"] and b["confidence"]]
        far = sum(a["no_similar_case"] == b["no_similar_case"] for a, b in pairs)
        gap = max(abs(a["nearest_distance"] - b["nearest_distance"]) for a, b in pairs)
        lines.append(
            f"{way}: same answer (tumor found, type) {same} of {len(pairs)}, confidence at most "
            f"{max(conf, default=0):.4f} apart, same 'no similar case' {far} of {len(pairs)}, nearest trunk "
            f"distance at most {gap:.4f} apart"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "models" / "lesion-fold5")
    ap.add_argument("--sizes", type=int, nargs="+", default=[0, 100_000])
    ap.add_argument("--store", choices=("flat", "milvus"), default="flat")
    ap.add_argument("--queries", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from neurocbir.data.cases import load_cases
    from neurocbir.data.uploads import read_scan
    from neurocbir.serving.service import RetrievalService

    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
    (ROOT / "cache").mkdir(exist_ok=True)
    table = load_cases()
    test = np.flatnonzero(table.fold == 5)[: args.queries]
    images = [read_scan(table.loader.image_path(int(table.idx[r])).read_bytes(), "q.jpg") for r in test]
    body = [
        "## The query's parts at scale (issue 41)",
        "",
        f"Command: `python benchmarks/query_stages.py {' '.join(sys.argv[1:])}` | machine: {machine()} | {started}",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
    ]
    for label, archive in archives(args.sizes, args.store, args.run):
        svc = RetrievalService.from_archive(args.run, archive)
        remote = getattr(svc.cases.store, "remote", False)
        res = measure(svc, images, args.rounds, remote)
        app = np.median(res["times"]["the app"])
        body += [
            "",
            f"**{label}**: {len(images)} queries each way, {args.rounds} rounds",
            "",
            "| way | p50 (ms) | p95 (ms) | p50 against the app's |",
            "|---|---:|---:|---:|",
            *[
                f"| {w} | {np.median(t):.1f} | {np.percentile(t, 95):.1f} | {np.median(t) / app:.2f}x |"
                for w, t in res["times"].items()
            ],
            "",
            "| part (the app's queries) | calls | p50 (ms) | p95 (ms) |",
            "|---|---:|---:|---:|",
            *[
                f"| {p} | {len(v)} | {np.median(v):.1f} | {np.percentile(v, 95):.1f} |"
                for p, v in res["parts"].items()
                if v
            ],
            "",
            *[f"- {line}" for line in agreement(res)],
        ]
        print("\n".join(body[-20:]), flush=True)
        del svc
    body += ["", f"{time.time() - t0:.0f} s in all."]
    write_section("query-stages", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
