"""The other hospitals' development part for a machine without the shared data: ``metadata.csv``
whole (the development split is computed from it) and the development part's images and masks only (a
training there never reads the validation part), in a folder of the source's own name: the
errata (figshare copies among its slices, ``neurocbir.data.external.errata_of``) are known by that
name, so a copy under another name would train on them.

    python tools/remote-gpu/bundle_external.py SRC OUT_ROOT     # -> OUT_ROOT/<name of SRC>/
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from neurocbir.data.external import load_external, part


def copy_development(src: Path | str, out_root: Path | str) -> Path:
    src = Path(src)
    out = Path(out_root) / src.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy(src / "metadata.csv", out / "metadata.csv")
    dev = part(load_external(src), "development")
    for f in [*dev.files, *(m for m in dev.mask_files if m)]:  # TCGA slices come with their masks
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / f, out / f)
    return out


if __name__ == "__main__":
    print(copy_development(sys.argv[1], sys.argv[2]))
