"""Search latency and recall@25 of the case stores at 10k, 100k and 1M vectors (plus the real
3064), exact vs approximate, FAISS beside Milvus Lite.

    .venv/bin/python benchmarks/store_scale.py [--sizes 10000 100000 1000000] [--milvus-sizes ...]

Synthetic archives are drawn around the real embeddings of a trained run (default:
runs/bench/supcon-fold5, trial 0): each vector is a random point on the segment between two
real archive embeddings of the same class plus isotropic noise of the size of a real
nearest-neighbour gap, so the synthetic archive fills the real class manifolds instead of
being i.i.d. noise. Queries are the run's real held-out (test-fold) embeddings.
Latency is one query at a time (as the app searches), median and p95 over the queries;
recall@25 is measured against the exact FAISS search of the same archive (with a 0.1% distance
tolerance for near-ties).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from results_doc import machine, write_section

ROOT = Path(__file__).resolve().parents[1]

K = 25


def synthetic(
    real: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator, sources: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """``n`` vectors on the real class manifolds (segments between same-class embeddings + noise);
    with ``sources``, also the real case each vector starts from (for its attributes)."""
    import faiss

    index = faiss.IndexFlatL2(real.shape[1])
    index.add(real)
    d2, _ = index.search(real, 2)
    sigma = float(np.median(np.sqrt(d2[:, 1]))) / np.sqrt(real.shape[1])
    out = np.empty((n, real.shape[1]), np.float32)
    origin = np.empty(n, np.int64)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        cls = rng.integers(len(by_class), size=m)
        a = np.array([rng.choice(by_class[c]) for c in cls])
        b = np.array([rng.choice(by_class[c]) for c in cls])
        lam = rng.random((m, 1), dtype=np.float32)
        out[s : s + m] = real[a] + lam * (real[b] - real[a]) + rng.normal(0, sigma, (m, real.shape[1]))
        origin[s : s + m] = a
    return (out, origin) if sources else out


def timed_queries(search, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids of top-K per query (one query per call) and the per-query times in ms."""
    search(queries[:1])  # warm-up
    ids, times = [], []
    for q in queries:
        t = time.perf_counter()
        i = search(q[None])
        times.append((time.perf_counter() - t) * 1000)
        ids.append(i[0])
    return np.array(ids), np.array(times)


def recall(found: np.ndarray, truth: np.ndarray, x: np.ndarray, queries: np.ndarray, eps: float = 1e-3) -> float:
    """recall@K with a distance tolerance (as ANN-benchmarks): a retrieval counts when it is no
    farther than the exact K-th neighbour (+0.1%), so float rounding between near-ties is not
    counted as a miss."""
    hits = []
    for f, t, q in zip(found, truth, queries):
        kth = np.linalg.norm(x[t[-1]] - q)
        f = f[f >= 0]
        hits.append(np.sum(np.linalg.norm(x[f] - q, axis=1) <= kth * (1 + eps)) / len(t))
    return float(np.mean(hits))


def bench_size(x: np.ndarray, queries: np.ndarray, milvus: bool, tmp: Path, ef_values, nprobe_values) -> list[dict]:
    import faiss

    from neurocbir.retrieval.milvus import MilvusStore
    from neurocbir.retrieval.store import FaissStore

    n, dim = x.shape
    ids = np.arange(n, dtype=np.int64)
    rows = []

    def add_row(backend, setting, build_s, found, times, truth):
        rows.append(
            {
                "n": n,
                "backend": backend,
                "setting": setting,
                "build_s": build_s,
                "p50": float(np.median(times)),
                "p95": float(np.percentile(times, 95)),
                "recall": recall(found, truth, x, queries),
            }
        )
        r = rows[-1]
        print(
            f"  {backend:22s} {setting:22s} build {build_s:7.1f}s  p50 {r['p50']:7.3f} ms  "
            f"p95 {r['p95']:7.3f} ms  recall@25 {r['recall']:.4f}",
            flush=True,
        )

    t = time.perf_counter()
    flat = FaissStore(tmp / "flat.faiss", dim)
    for b in range(0, n, 50_000):
        flat.add(ids[b : b + 50_000], x[b : b + 50_000])
    build = time.perf_counter() - t
    truth, times = timed_queries(lambda q: flat.search(q, K)[1], queries)
    add_row("FAISS exact (flat)", "-", build, truth, times, truth)
    flat = None  # free it before the next build

    t = time.perf_counter()
    hnsw = FaissStore(tmp / "hnsw.faiss", dim, kind="hnsw")
    for b in range(0, n, 50_000):
        hnsw.add(ids[b : b + 50_000], x[b : b + 50_000])
    build = time.perf_counter() - t
    base = faiss.downcast_index(hnsw.parts[""].index)  # one partition: no group keys given
    for ef in ef_values:
        base.hnsw.efSearch = ef
        found, times = timed_queries(lambda q: hnsw.search(q, K)[1], queries)
        add_row("FAISS HNSW (M=32)", f"efSearch={ef}", build, found, times, truth)
    hnsw = base = None

    nlist = int(4 * np.sqrt(n))
    t = time.perf_counter()
    quant = faiss.IndexFlatL2(dim)
    ivf = faiss.IndexIVFFlat(quant, dim, nlist)
    ivf.train(x[np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False)])
    ivf.add(x)
    build = time.perf_counter() - t
    for nprobe in nprobe_values:
        ivf.nprobe = nprobe
        found, times = timed_queries(lambda q: ivf.search(q, K)[1], queries)
        add_row("FAISS IVF-Flat", f"nlist={nlist} nprobe={nprobe}", build, found, times, truth)
    ivf = quant = None

    if milvus:
        t = time.perf_counter()
        m = MilvusStore(str(tmp / "milvus.db"), "cases", dim)
        for b in range(0, n, 20_000):
            m.add(ids[b : b + 20_000], x[b : b + 20_000])
        m.save()
        build = time.perf_counter() - t
        found, times = timed_queries(lambda q: m.search(q, K)[1], queries)
        add_row(
            "Milvus Lite",
            "FLAT requested; built " + m.client.describe_index("cases", "vector")["index_type"],
            build,
            found,
            times,
            truth,
        )
        m.close()
    return rows


def milvus_lite_index(tmp: Path, x: np.ndarray, index_type: str, params: dict) -> str:
    """The index Milvus Lite builds when asked for ``index_type`` (its describe_index answer)."""
    from neurocbir.retrieval.milvus import MilvusStore

    m = MilvusStore(
        str(tmp / f"probe_{index_type}.db"), "probe", x.shape[1], index_type=index_type, index_params=params
    )
    m.add(np.arange(len(x)), x)
    m.save()
    kind = m.client.describe_index("probe", "vector")["index_type"]
    m.close()
    return kind


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=ROOT / "runs" / "bench" / "supcon-fold5")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--milvus-sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--ef", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 64])
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/results.md alone")
    args = p.parse_args()
    emb_file = args.run / "trial_0" / "embeddings.npz"
    if not emb_file.is_file():
        sys.exit(f"{emb_file} not found: train a run first (python benchmarks/core_results.py) or pass --run")
    from neurocbir.data.cases import load_cases

    emb = np.load(emb_file)
    table = load_cases()
    archive, test = emb["archive"].astype(np.float32), emb["test"].astype(np.float32)
    labels = table.label[emb["archive_rows"]]
    queries = test[np.random.default_rng(1).choice(len(test), min(args.queries, len(test)), replace=False)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        real = np.concatenate([archive, test])
        print(f"real archive: {len(real)} vectors", flush=True)
        rows += bench_size(real, queries, True, Path(tmp), args.ef, args.nprobe)
        lite_kinds = {
            k: milvus_lite_index(Path(tmp), real, k, p) for k, p in (("FLAT", {}), ("IVF_FLAT", {"nlist": 64}))
        }
        rng = np.random.default_rng(0)
        for n in args.sizes:
            print(f"synthetic archive: {n} vectors", flush=True)
            x = synthetic(archive, labels, n, rng)
            with tempfile.TemporaryDirectory(dir=tmp) as sub:
                rows += bench_size(x, queries, n in args.milvus_sizes, Path(sub), args.ef, args.nprobe)
            del x
    if args.no_write:
        return
    lines = [
        "## Case store scale: search latency and recall@25 (issue 5)",
        "",
        f"`python benchmarks/store_scale.py --sizes {' '.join(map(str, args.sizes))} --milvus-sizes "
        f"{' '.join(map(str, args.milvus_sizes))} --queries {len(queries)}`, {time.strftime('%Y-%m-%d')}, {machine()}.",
        "",
        f"Archive: the real 3064 embeddings of `{args.run.relative_to(ROOT) if args.run.is_relative_to(ROOT) else args.run}` "
        f"(the queries, drawn from its {len(test)} test-fold embeddings, are in it), then synthetic 128-d archives drawn on the real class manifolds "
        "(see the script's docstring). Queries: real held-out embeddings, one per call, K = 25. "
        "Build = adding all vectors (and training, for IVF); recall@25 against FAISS exact, counting a "
        "retrieval as found when it is no farther than the exact 25th neighbour (+0.1%, as ANN-benchmarks does).",
        "",
        "Milvus Lite (a local server process answering over gRPC; the store asks for a FLAT index): asked for "
        + " and ".join(f"{k} it reports `{v}`" for k, v in lite_kinds.items())
        + " (`describe_index`), so its rows measure the index Milvus Lite picks itself, which need not be exact; "
        "choosing FLAT / IVF / HNSW needs Milvus standalone or a cluster (`neurocbir add --milvus-index`).",
        "",
        "| archive | backend | setting | build s | p50 ms/query | p95 ms/query | recall@25 |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['backend']} | {r['setting']} | {r['build_s']:.1f} | {r['p50']:.3f} | "
            f"{r['p95']:.3f} | {r['recall']:.4f} |"
        )
    ok = [r for r in rows if r["n"] >= 1_000_000 and r["p50"] <= 5 and r["recall"] >= 0.99]
    lines += [
        "",
        "Target at 1M (p50 <= 5 ms with recall@25 >= 0.99): "
        + (
            "met by " + "; ".join(f"{r['backend']} {r['setting']} ({r['p50']:.2f} ms, {r['recall']:.3f})" for r in ok)
            if ok
            else ("not met by any setting" if any(r["n"] >= 1_000_000 for r in rows) else "1M not run")
        ),
    ]
    write_section("scale", "\n".join(lines))
    print("wrote the 'scale' section of docs/results.md")


if __name__ == "__main__":
    main()
