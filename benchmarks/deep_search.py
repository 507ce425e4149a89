"""NIR's deep search at scale (issue 41): the doubling search against the search by label.

    .venv/bin/python benchmarks/deep_search.py [--cases 100000]

A flat FAISS store partitioned by label and plane as an archive's is, of synthetic unit vectors
(four labels around four centres that overlap, so a query's first retrievals are often all of
one label, the case the depth doubling is for; the fourth, as an archive's no-tumor cases, no NIR
retrieval; 20 slices per patient, one kept per patient).
Each query is searched twice: the depth doubling from 64 over every partition, and the search by
label (`neurocbir.retrieval.store._by_label`: the 64 nearest of each label in its partitions, merged;
where they all share a label, a range search of that label's partitions up to the nearest case of
another, which is in hand). The same queries both ways, interleaved; NIR's positions must agree.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from results_doc import machine, write_section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=60)
    args = ap.parse_args()
    import neurocbir.retrieval.store as store_module
    from neurocbir.classify.neighbors import nir_positions
    from neurocbir.retrieval.store import NIR_MAX_DEPTH, FaissStore, deep_search, group_keys, lookup

    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
    rng = np.random.default_rng(0)
    n, d = args.cases, 128
    labels = rng.choice(4, n, p=[0.3, 0.3, 0.25, 0.15])
    x = (rng.standard_normal((4, d))[labels] * 0.6 + rng.standard_normal((n, d))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64)
    planes = np.array(["axial", "coronal", "sagittal", ""])[rng.integers(0, 4, n)]
    store = FaissStore("unused.faiss", d)
    store.add(ids, x, group_keys(labels, planes))
    # label 3 as an archive's no-tumor cases: no NIR retrieval (-1), in partitions of their own
    label_of, patient_of = lookup(ids, np.where(labels < 3, labels, -1)), lookup(ids, ids // 20)
    by_label = store_module._by_label
    ways = {"doubling the depth": lambda *a: None, "by label (the app's)": by_label}
    times = {w: [] for w in ways}
    runs, agree, none_typed = [], 0, 0
    for q in x[rng.choice(n, args.queries, replace=False)] + 0.01:
        positions, typed = [], []
        for way, fn in ways.items():
            store_module._by_label = fn
            t = time.perf_counter()
            _, _, found = deep_search(store, label_of, q[None], 3, 1, patient_of, 64)
            times[way].append(1000 * (time.perf_counter() - t))
            positions.append(nir_positions(found, 3))
            typed.append(int((found >= 0).sum()))
        store_module._by_label = by_label
        agree += int((positions[0] == positions[1]).all())
        none_typed += int(typed[0] == 0 and typed[1] > 0)
        runs.append(int(positions[1].max()))
    rows = [
        f"| {w} | {np.median(t):.1f} | {np.quantile(t, 0.9):.1f} | {np.median(times[list(ways)[0]]) / np.median(t):.1f}x |"
        for w, t in times.items()
    ]
    body = [
        "## NIR's deep search at scale (issue 41)",
        "",
        f"Command: `python benchmarks/deep_search.py --cases {n}` | machine: {machine()} | {started} | "
        f"{time.time() - t0:.0f} s",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        f"{n} cases, {args.queries} queries; NIR positions identical both ways for {agree} of {args.queries} "
        f"(both read at most {NIR_MAX_DEPTH} retrievals of a typed case, one per patient, and skip cases of no type; "
        f"queries where the doubling search found no typed case and the search by label did: {none_typed} of "
        f"{args.queries}); "
        f"the first label's run (patients before another label) median {int(np.median(runs))}, "
        f"longest {max(runs)}.",
        "",
        "| deep search | median ms | p90 ms | speed-up of the median |",
        "|---|---|---|---|",
        *rows,
    ]
    write_section("deep-search", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
