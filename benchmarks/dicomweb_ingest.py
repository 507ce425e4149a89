"""DICOMweb ingest throughput: `neurocbir add --dicomweb` from a real Orthanc PACS on loopback.

    .venv/bin/python benchmarks/dicomweb_ingest.py [--n 600] [--run models/lesion-fold5]

Stores N slices of the bundled dataset (512 px, converted to DICOM, one study per patient) in a
fresh Orthanc (Debian's orthanc + orthanc-dicomweb), then times, in one run:
* the ingest as the CLI runs it (QIDO-RS listing, WADO-RS retrieval of each instance, CNN,
  SQLite and FAISS commits; the next batch is fetched while one is embedded);
* the retrieval alone (no CNN), and the same slices added from a folder (the CNN bound);
* a rerun (everything already there: nothing is downloaded).
Target (issue 12): >= 15 slices/s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from results_doc import machine, write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=600, help="slices stored in the PACS and ingested")
    p.add_argument("--run", type=Path, default=ROOT / "models" / "lesion-fold5")
    args = p.parse_args()
    import numpy as np
    from tests.orthanc import running_orthanc

    from neurocbir.data.cases import CLASS_NAMES, default_data_dir, load_cases
    from neurocbir.models.inference import load_model
    from neurocbir.retrieval.archive import CaseArchive
    from neurocbir.retrieval.casefiles import scan_folder
    from neurocbir.retrieval.dicomweb import client, fetch_dataset, list_instances, to_dicom
    from neurocbir.retrieval.ingest import add_folder, ingest

    table = load_cases(default_data_dir())
    rows = np.random.default_rng(0).choice(len(table), args.n, replace=False)
    user, password = "bench", "bench-secret"
    os.environ["NEUROCBIR_DICOMWEB_USER"], os.environ["NEUROCBIR_DICOMWEB_PASSWORD"] = user, password
    with tempfile.TemporaryDirectory() as tmp, running_orthanc(Path(tmp) / "orthanc", user, password) as url:
        tmp = Path(tmp)
        studies, labels = {}, ["sop_instance_uid,label,plane,area_mm2"]
        datasets = []
        for n, r in enumerate(rows):
            study = studies.setdefault(table.patient_id[r], f"1.2.826.0.1.3680043.10.543.{len(studies) + 1}")
            sop = f"{study}.2.{n + 1}"
            datasets.append(to_dicom(table.load_image(int(r)), f"PAT-{table.patient_id[r]}", study, f"{study}.1", sop))
            labels.append(f"{sop},{CLASS_NAMES[int(table.label[r])]},{table.plane[r]},{float(table.area_mm2[r]):.2f}")
        for b in range(0, len(datasets), 50):
            client(url).store_instances(datasets[b : b + 50])
        (tmp / "labels.csv").write_text("\n".join(labels) + "\n")

        t = time.perf_counter()
        out = ingest(None, tmp / "archive", args.run, dicomweb=url, labels=tmp / "labels.csv")
        ingest_s = time.perf_counter() - t
        t = time.perf_counter()
        again = ingest(None, tmp / "archive", args.run, dicomweb=url, labels=tmp / "labels.csv")
        rerun_s = time.perf_counter() - t
        assert out["added"] == args.n and again["added"] == 0, (out, again)

        t = time.perf_counter()
        for ref in list_instances(url):
            fetch_dataset(url, ref).pixel_array  # noqa: B018 - decode, as the ingest does
        fetch_s = time.perf_counter() - t

        model = load_model(args.run)
        files = [f for f in scan_folder(default_data_dir()) if f.source_case in set(table.idx[rows].tolist())]
        arch = CaseArchive.create(tmp / "folder-archive", model.embedding_dim, model.checkpoint_sha256)
        t = time.perf_counter()
        add_folder(arch, files, model.embed)
        folder_s = time.perf_counter() - t
        arch.close()
    n = args.n
    body = "\n".join(
        [
            "## DICOMweb ingest: `neurocbir add --dicomweb` from a real Orthanc (issue 12)",
            "",
            f"Command: `python benchmarks/dicomweb_ingest.py --n {n} --run {args.run.relative_to(ROOT) if args.run.is_relative_to(ROOT) else args.run}` | "
            f"machine: {machine()} | {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            f"{n} slices of the bundled data (512 px, 16-bit DICOM, one study per patient) in Orthanc 1.10 "
            "(Debian, DICOMweb plugin, HTTP basic auth) on loopback; one run, so the rows compare.",
            "",
            "| what | seconds | slices/s |",
            "|---|---|---|",
            f"| `add --dicomweb` (QIDO list, WADO-RS fetch, CNN, commits) | {ingest_s:.1f} | **{n / ingest_s:.1f}** |",
            f"| WADO-RS fetch and decode alone (no CNN) | {fetch_s:.1f} | {n / fetch_s:.1f} |",
            f"| the same slices from a folder (`add FOLDER`, the CNN bound) | {folder_s:.1f} | {n / folder_s:.1f} |",
            f"| rerun, all already there (nothing downloaded) | {rerun_s:.1f} | - |",
            "",
            "Target: >= 15 slices/s on 2 cores.",
        ]
    )
    write_section("dicomweb", body)
    print(body)


if __name__ == "__main__":
    main()
