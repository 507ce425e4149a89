"""Filtered retrieval at scale (issue 12): plane / tumor type / size filters applied inside the
vector store, on a synthetic archive of up to 1M cases built on the real embedding manifold.

    .venv/bin/python benchmarks/filtered_search.py [--run models/lesion-fold5] [--sizes 100000 1000000]

Each vector starts from a real archive case and takes its label, plane and tumor size. The
stores are partitioned by tumor type and plane, as an archive's are. The timed path is what a
filtered query does after its CNN pass (``ArchiveCases.filtered``, called as is): pick the
partitions of the type and plane, and for a size range the mask over the sizes and the FAISS
ID selector; the search (k = 5). Exact (flat) and HNSW stores; recall@5 of HNSW against the
exact filtered answer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from results_doc import machine, write_section
from store_scale import synthetic

ROOT = Path(__file__).resolve().parents[1]
FILTERS = {
    "none": {},
    "tumor type (glioma)": {"tumor_type": "glioma"},
    "plane + type (axial glioma)": {"plane": "axial", "tumor_type": "glioma"},
    "size 500-1500 mm²": {"min_area_mm2": 500.0, "max_area_mm2": 1500.0},
    "plane + type + size": {"plane": "axial", "tumor_type": "glioma", "min_area_mm2": 500.0, "max_area_mm2": 1500.0},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=ROOT / "models" / "lesion-fold5")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=200)
    args = p.parse_args()
    from neurocbir.data.cases import load_cases
    from neurocbir.models.runs import first_trial
    from neurocbir.retrieval.store import FaissStore, group_keys, lookup
    from neurocbir.serving.archive_cases import ArchiveCases
    from neurocbir.serving.sources import CaseFilter

    table = load_cases()
    emb = np.load(args.run / f"trial_{first_trial(args.run)}" / "embeddings.npz")
    real, rows = emb["archive"], emb["archive_rows"]
    queries = emb["test"][: args.queries]
    rng = np.random.default_rng(0)
    lines = []
    for n in args.sizes:
        x, origin = synthetic(real, table.label[rows], n, rng, sources=True)
        labels, planes = table.label[rows][origin], table.plane[rows][origin]
        areas = table.area_mm2[rows][origin] * rng.uniform(0.9, 1.1, n)
        ids = np.arange(1, n + 1, dtype=np.int64)
        groups = group_keys(labels, planes)
        with tempfile.TemporaryDirectory() as tmp:
            stores = {}
            for kind in ("flat", "hnsw"):
                t0 = time.perf_counter()
                s = FaissStore(Path(tmp) / f"{kind}.faiss", x.shape[1], kind=kind)
                for b in range(0, n, 100_000):
                    s.add(ids[b : b + 100_000], x[b : b + 100_000], groups[b : b + 100_000])
                source = ArchiveCases.__new__(ArchiveCases)  # the archive's own search, without a 1M-row SQLite
                source.store, source.store_ids, source.label_of = s, ids, lookup(ids, labels)
                source.attr_label, source.attr_plane, source.attr_area = labels, planes, areas
                stores[kind] = (source, time.perf_counter() - t0)
            for name, spec in FILTERS.items():
                f = CaseFilter(**spec)
                results = {}
                for kind, (source, _) in stores.items():
                    found, times = [], []
                    for q in queries:
                        t = time.perf_counter()
                        if f.active():
                            got = source.filtered(q[None], f, 5, one_per_patient=False)[1]
                        else:
                            got = source.store.search(q[None], 5)[1][0]
                        times.append((time.perf_counter() - t) * 1000)
                        found.append(np.pad(got, (0, 5 - len(got)), constant_values=-1))
                    results[kind] = (np.array(found), np.array(times))
                share = f.mask(labels, planes, areas).mean()
                exact = results["flat"][0]
                rec = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(results["hnsw"][0], exact)])
                lines.append(
                    f"| {n:,} | {name} | {share:.3f} | {np.percentile(results['flat'][1], 50):.2f} | "
                    f"{np.percentile(results['hnsw'][1], 50):.2f} | {np.percentile(results['hnsw'][1], 95):.2f} | {rec:.3f} |"
                )
                print(lines[-1], flush=True)
    body = "\n".join(
        [
            "## Filtered retrieval at scale (issue 12)",
            "",
            f"Command: `python benchmarks/filtered_search.py {' '.join(sys.argv[1:])}` | machine: {machine()} | "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | synthetic archives on the embedding manifold of "
            f"`{args.run.name}` (each vector takes a real case's label, plane and size, the size x U(0.9, 1.1)) | "
            f"{len(queries)} test-fold queries, k = 5, one query per call; stores partitioned by tumor type and plane; "
            "the time includes picking the partitions and, for a size range, the mask and the FAISS ID selector",
            "",
            "| cases | filter | share of cases passing | flat p50 (ms) | HNSW p50 (ms) | HNSW p95 (ms) | HNSW recall@5 vs exact |",
            "|---:|---|---:|---:|---:|---:|---:|",
            *lines,
        ]
    )
    write_section("filtered", body)
    print(body)


if __name__ == "__main__":
    main()
