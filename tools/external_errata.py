"""Errata of the other hospitals' slices (version 2): the slices that are figshare slices (any
orientation), and validation slices whose twin is in the development part (another group).

    .venv/bin/python tools/external_errata.py   # rewrites src/neurocbir/data/external_errata.csv

The split is computed on every slice (so that it stays the one models were trained with); then
:func:`neurocbir.data.external.development_split` leaves out the figshare copies from both parts
and the twins from the validation part. Method and threshold: :mod:`neurocbir.retrieval.duplicates`.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from neurocbir.data.cases import default_data_dir, load_cases
from neurocbir.data.external import ERRATA_FILE, default_external_dir, development_split, load_external
from neurocbir.retrieval.duplicates import DuplicateIndex, ImagePrints


def main() -> None:
    data = default_data_dir()
    table = load_cases(data)
    root = default_external_dir(data)
    ext = load_external(root)
    dev, val = development_split(ext, errata=False)
    figshare = DuplicateIndex.of_images((table.load_image(i) for i in range(len(table))), [int(i) for i in table.idx])
    development = DuplicateIndex.of_images((ext.load_image(int(i)) for i in dev), [int(i) for i in dev])
    rows = []
    for i in range(len(ext)):
        image = ImagePrints(ext.load_image(i))
        found = figshare.find(image)
        if found:
            d = found[0]
            rows.append((root.name, ext.files[i], "figshare", f"figshare case {d.case_id}", d.mirrored, d.similarity))
        elif i in set(val.tolist()):
            twins = [d for d in development.find(image) if ext.groups[d.case_id] != ext.groups[i]]
            if twins:
                d = twins[0]
                rows.append((root.name, ext.files[i], "twin", ext.files[d.case_id], d.mirrored, d.similarity))
        if i % 500 == 0:
            print(f"{i}/{len(ext)}", file=sys.stderr, flush=True)
    out = Path(__file__).resolve().parents[1] / "src" / "neurocbir" / "data" / ERRATA_FILE
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dataset", "image_file", "kind", "duplicate_of", "mirrored", "similarity"])
        w.writerows(rows)
    print(f"{len(rows)} errata written to {out}")


if __name__ == "__main__":
    main()
