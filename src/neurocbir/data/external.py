"""Slices from other hospitals, with and without a tumor: a folder with ``metadata.csv``
(``image_file,label_name[,group]``) and the images it names, as the brain-tumor-external set is
laid out (``label_name``: a tumor type, or ``notumor``).

There are no patient ids; ``group`` joins near-duplicate slices (likely one patient), so every
split is by group: :func:`development_split` puts whole groups in the development part (training,
thresholds, archive additions) or in the validation part (reporting only)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neurocbir.data.cases import CASE_LABELS, CLASS_NAMES, NO_TUMOR, DatasetError, read_gray

LABELS = CASE_LABELS
VALIDATION_SHARE = 0.5
#: the two sides of :func:`development_split`, in its order
PARTS = ("development", "validation")
SPLIT_SEED = 0


@dataclass
class ExternalCases:
    """The slices of one folder: files, labels (names from :data:`LABELS`) and groups."""

    root: Path
    files: np.ndarray
    labels: np.ndarray
    groups: np.ndarray

    def __len__(self) -> int:
        return len(self.files)

    @property
    def tumor(self) -> np.ndarray:
        """Which slices show a tumor."""
        return self.labels != NO_TUMOR

    @property
    def label_index(self) -> np.ndarray:
        """Tumor type as an index into :data:`CLASS_NAMES` (-1 for no tumor)."""
        return np.array([CLASS_NAMES.index(v) if v in CLASS_NAMES else -1 for v in self.labels])

    def path(self, i: int) -> Path:
        return self.root / str(self.files[i])

    def load_image(self, i: int) -> np.ndarray:
        return read_gray(self.path(i))

    def subset(self, rows: np.ndarray) -> ExternalCases:
        rows = np.asarray(rows)
        return ExternalCases(self.root, self.files[rows], self.labels[rows], self.groups[rows])


def is_external_layout(root: Path | str) -> bool:
    """A folder whose metadata.csv names images by ``image_file`` and labels by ``label_name``,
    with no patient-wise folds (the bundled figshare layout has both, and ``cvind_fold``)."""
    meta = Path(root) / "metadata.csv"
    if not meta.is_file():
        return False
    with meta.open(newline="", encoding="utf-8-sig") as fh:
        header = next(csv.reader(fh), [])
    return {"image_file", "label_name"} <= set(header) and "cvind_fold" not in header


def load_external(root: Path | str) -> ExternalCases:
    """Read an external folder's ``metadata.csv``, checking every label and file name."""
    root = Path(root)
    meta = root / "metadata.csv"
    if not is_external_layout(root):
        raise DatasetError(f"{root} has no metadata.csv with columns image_file,label_name")
    with meta.open(newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise DatasetError(f"{meta} has no rows")
    files, labels, groups = [], [], []
    for n, r in enumerate(rows, 2):
        label = (r.get("label_name") or "").strip().lower()
        if label not in LABELS:
            raise DatasetError(
                f"{meta}, line {n}: label_name {r.get('label_name')!r} is not one of {', '.join(LABELS)}"
            )
        name = (r.get("image_file") or "").strip()
        path = (root / name).resolve()
        if not name or not path.is_relative_to(root.resolve()):
            raise DatasetError(f"{meta}, line {n}: {name!r} is not a file inside {root}")
        files.append(name)
        labels.append(label)
        groups.append((r.get("group") or "").strip() or f"row{n}")  # no group: the slice is its own
    return ExternalCases(root, np.array(files), np.array(labels), np.array(groups))


def development_split(
    cases: ExternalCases, validation_share: float = VALIDATION_SHARE, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """(development rows, validation rows): whole groups on one side, each label in about the
    same share on both (scikit-learn's StratifiedGroupKFold; a fixed seed, so the split is the
    same everywhere)."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, round(1 / validation_share))
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    dev, val = next(cv.split(np.zeros(len(cases)), cases.labels, groups=cases.groups))
    return np.sort(dev), np.sort(val)
