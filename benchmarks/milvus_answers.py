"""Do the app's answers over a Milvus server match those over FAISS? (issue 41) The demo archive's
cases (what `make demo` serves: figshare's training folds and the other hospitals' development
part, with their embeddings, trunk descriptors and prints as stored) copied into an archive on a
Milvus standalone server (HNSW, as `neurocbir add --milvus-index HNSW` makes it for a large
archive), and every figshare fold-5 slice sent to both through the app's query path
(`RetrievalService.query`); the same cases, the same model, the same run.

    .venv/bin/python benchmarks/milvus_answers.py [--run models/lesion-fold5]

Counted: the same answer (tumor type, "no tumor", or none), the same five evidence cases in the
same order, the largest difference of a shown probability.
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
sys.path.insert(0, str(ROOT))


def copy_archive(source: Path, root: Path, uri: str, index: str) -> dict[int, int]:
    """Every indexed case of ``source``, as stored, into a new archive on the Milvus server ``uri``;
    returns the copy's case id of each source case id (the patient key, already a salted hash, is
    hashed again with the copy's salt: the same patients stay together)."""
    from neurocbir.retrieval.archive import CaseArchive, CaseRecord

    src = CaseArchive.open(source, writer=False)
    cols = "id, content_sha256, label, patient_key, plane, area_mm2, image_path, embedding, trunk, source_case, report, fingerprint"
    rows = src.db.execute(f"SELECT {cols} FROM cases WHERE state = 'indexed' ORDER BY id").fetchall()
    meta = src.meta
    arch = CaseArchive.create(
        root, int(meta["dim"]), meta["checkpoint_sha256"], "milvus", uri, meta.get("run", ""), index
    )

    def vec(blob, dtype):
        return None if blob is None else np.frombuffer(blob, dtype)

    records = [
        CaseRecord(r[1], r[2], r[3], r[4], r[5], r[6], vec(r[7], np.float32), vec(r[8], np.float32), r[9], r[10],
                   vec(r[11], np.float16))
        for r in rows
    ]  # fmt: skip
    arch.add(records)
    new = dict(arch.db.execute("SELECT content_sha256, id FROM cases").fetchall())
    arch.close()
    return {r[0]: new[r[1]] for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "models" / "lesion-fold5")
    ap.add_argument("--index", default="HNSW", choices=("HNSW", "FLAT"))
    args = ap.parse_args()
    from tests.milvus_server import MilvusServer

    from neurocbir.data.cases import load_cases
    from neurocbir.models.inference import load_model
    from neurocbir.serving.archive_cases import ArchiveCases
    from neurocbir.serving.demo import demo_archive
    from neurocbir.serving.service import RetrievalService

    started, t0 = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
    model = load_model(args.run)
    source = demo_archive(args.run)
    table = load_cases()
    rows = np.flatnonzero(table.fold == model.config.fold)
    images = [table.load_image(int(i)) for i in rows]
    server = MilvusServer(Path(tempfile.mkdtemp(prefix="milvus-")))
    server.start()
    try:
        with tempfile.TemporaryDirectory(dir=ROOT / "cache") as tmp:
            ids = copy_archive(source, Path(tmp) / "milvus-archive", server.uri, args.index)
            on = {}
            for name, root in (("faiss", source), ("milvus", Path(tmp) / "milvus-archive")):
                svc = RetrievalService(model, ArchiveCases(root, model.checkpoint_sha256, model.embedding_dim))
                on[name] = [svc.query(im, k=5) for im in images]
                print(name, "answered", flush=True)
    finally:
        server.stop()
    a, b = on["faiss"], on["milvus"]

    def answer(o: dict) -> str:
        return o["prediction"] or ("no tumor" if o["tumor_found"] is False else "none")

    same = np.mean([answer(x) == answer(y) for x, y in zip(a, b)])
    same5 = np.mean(
        [[ids[r["case_id"]] for r in x["retrievals"]] == [r["case_id"] for r in y["retrievals"]] for x, y in zip(a, b)]
    )
    diff = max(
        abs((x["probabilities"] or {}).get(c, 0.0) - (y["probabilities"] or {}).get(c, 0.0))
        for x, y in zip(a, b)
        for c in set(x["probabilities"] or {}) | set(y["probabilities"] or {})
    )
    body = "\n".join(
        [
            "## The same answers over a Milvus server as over FAISS (issue 41)",
            "",
            f"Command: `python benchmarks/milvus_answers.py --index {args.index}` | machine: {machine()} | {started} | "
            f"{time.time() - t0:.0f} s",
            "",
            f"The demo archive's {len(ids)} cases copied as stored into an archive on a Milvus standalone server "
            f"({args.index}); figshare fold {model.config.fold} ({len(rows)} slices) sent to both through "
            "`RetrievalService.query`.",
            "",
            "| same answer | same five evidence cases, same order | largest difference of a shown probability |",
            "|---:|---:|---:|",
            f"| {same:.2%} | {same5:.2%} | {diff:.4f} |",
        ]
    )
    write_section("milvus-answers", body)
    print(body)


if __name__ == "__main__":
    main()
