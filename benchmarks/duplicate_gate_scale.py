"""The duplicate check at a million cases (issue 41): `DuplicateIndex.find` over N stored cases,
the coarse prints searched exhaustively (float16, what every archive did before) and through the
inverted file an archive of `IVF_FROM` cases or more now gets; the same copies, the same run.

    .venv/bin/python benchmarks/duplicate_gate_scale.py [--cases 1000000] [--originals 200]

Stored: `--originals` figshare training-fold slices (a seeded sample) among synthetic cases made
from 1,500 others (each a slice's prints with noise, normalised as prints are: the archive's
distribution of brains that look alike, no two duplicates). Queried: copies of the originals as
archives receive them (benchmarks/duplicates.py: re-encoded, resized, cropped, mirrored, all at
once). Found: the copy's original is the first duplicate returned. And 100 other training-fold slices
that are not stored (what most queries are). Milliseconds per `find`, one thread, the fine prints of
candidates made on demand (an archive reads them from its database).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from duplicates import copies
from results_doc import machine, write_section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1_000_000)
    ap.add_argument("--originals", type=int, default=200)
    ap.add_argument("--seed", type=int, default=41)
    args = ap.parse_args()
    import faiss

    from neurocbir.data.cases import load_cases
    from neurocbir.retrieval.duplicates import IVF_FROM, IVF_LISTS, IVF_PROBE, DuplicateIndex, ImagePrints

    faiss.omp_set_num_threads(1)
    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
    print(f"seed {args.seed}", flush=True)
    rng = np.random.default_rng(args.seed)
    table = load_cases()
    train = np.flatnonzero(table.fold != 5)
    picked = rng.choice(train, args.originals + 1600, replace=False)
    originals, others, unseen = picked[: args.originals], picked[args.originals : -100], picked[-100:]
    base = [ImagePrints(table.load_image(int(i))) for i in others]
    coarse0 = np.stack([p.coarse[0] for p in base])
    fine0 = np.stack([p.fine for p in base])
    n, m = args.cases, args.originals
    origin = rng.integers(0, len(base), n)
    noise_seed = int(rng.integers(2**31))

    def noisy(v: np.ndarray, ids: np.ndarray, salt: int) -> np.ndarray:  # each case's own noise, made again on demand
        out = np.stack([v[i] + 0.05 * np.random.default_rng((noise_seed, salt, int(c))).standard_normal(v.shape[1])
                        for i, c in zip(origin[ids], ids)])  # fmt: skip
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)

    planted = np.sort(rng.choice(n, m, replace=False))
    real = [ImagePrints(table.load_image(int(i))) for i in originals]
    where = {int(c): k for k, c in enumerate(planted)}

    def fine(case_ids: list[int]) -> np.ndarray:
        ids = np.asarray(case_ids, dtype=np.int64)
        out = noisy(fine0, ids, 1)
        for j, c in enumerate(case_ids):
            if int(c) in where:
                out[j] = real[where[int(c)]].fine
        return out

    queries = [(k, q) for k, i in enumerate(originals) for q in copies(table.load_image(int(i)))]
    rows = []
    for name, expected in (("exhaustive (float16)", 0), (f"inverted file ({IVF_LISTS} lists, {IVF_PROBE} probed)", n)):
        index, built = DuplicateIndex(fine, expected=expected), time.time()
        for b in range(0, n, 50_000):
            ids = np.arange(b, min(n, b + 50_000))
            c = noisy(coarse0, ids, 0)
            for j, i in enumerate(ids):
                if int(i) in where:
                    c[j] = real[where[int(i)]].coarse[0]
            index.add(ids, c)
        built = time.time() - built
        ms, found = [], 0
        for k, q in queries:
            p = ImagePrints(q)
            p.coarse  # noqa: B018 (the query's own prints: not the index's time)
            t1 = time.perf_counter()
            dup = index.find(p)
            ms.append(1000 * (time.perf_counter() - t1))
            found += bool(dup) and dup[0].case_id == planted[k]
        fresh, taken = [], 0  # slices not stored: what most queries are
        for i in unseen:
            p = ImagePrints(table.load_image(int(i)))
            p.coarse  # noqa: B018
            t1 = time.perf_counter()
            taken += bool(index.find(p))
            fresh.append(1000 * (time.perf_counter() - t1))
        rows.append((name, built, found, len(queries), np.median(ms), np.percentile(ms, 95), np.median(fresh), taken))
        print(rows[-1], flush=True)
        del index
    body = "\n".join(
        [
            "## The duplicate check at a million cases (issue 41)",
            "",
            f"Command: `python benchmarks/duplicate_gate_scale.py --cases {n} --originals {m}` | machine: {machine()} | "
            f"{started} | {time.time() - t0:.0f} s | seed {args.seed}",
            "",
            f"{n:,} stored cases ({m} real figshare training-fold slices among synthetic ones); their copies (5 kinds "
            f"each, {len(queries)} queries) looked up one at a time, one thread. An archive gets the inverted file "
            f"from {IVF_FROM:,} cases.",
            "",
            "| coarse search | built (s) | copies found as their original | `find` of a copy, median / p95 (ms) "
            "| `find` of a slice not stored, median (ms) | slices not stored taken for a duplicate |",
            "|---|---:|---:|---:|---:|---:|",
            *[
                f"| {r[0]} | {r[1]:.0f} | {r[2]} / {r[3]} | {r[4]:.1f} / {r[5]:.1f} | {r[6]:.1f} | {r[7]} / 100 |"
                for r in rows
            ],
        ]
    )
    write_section("duplicate-gate-scale", body)
    print(body)


if __name__ == "__main__":
    main()
