"""Slices from other hospitals, with and without a tumor: a folder with ``metadata.csv``
(``image_file,label_name[,group,source,patient,slice,mask_file,flair_file]``) and the files it
names, as ``brain-tumor-external-v2`` is laid out.

``label_name`` is a tumor type, ``notumor``, or ``tumor``: a tumor whose type was not given (it
says that there is a tumor and nothing about its type: presence evidence, never type evidence).
``group`` joins slices that must stay on one side of every split (a patient's series, or
near-duplicate slices, mirrors included); :func:`development_split` puts whole groups in the
development part (training, thresholds, archive additions) or in the validation part (reporting
only). ``source`` names where each slice comes from, so that every figure can be given per source;
``patient`` and ``slice`` order a series (TCGA); ``mask_file`` is a tumor mask where one is given."""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from neurocbir.data.cases import CASE_LABELS, CLASS_NAMES, NO_TUMOR, DatasetError, read_gray
from neurocbir.errors import InvalidInput

LABELS = CASE_LABELS
VALIDATION_SHARE = 0.5
#: the two sides of :func:`development_split`, in its order
PARTS = ("development", "validation")
SPLIT_SEED = 0
OPTIONAL = ("source", "patient", "slice", "mask_file", "flair_file")
EXTERNAL_ENV = "NEUROCBIR_EXTERNAL"
#: slices of published folders that are not what they claim (tools/external_errata.py): figshare
#: copies (left out of both parts) and validation slices whose twin is in the development part
#: (left out of the validation part)
ERRATA_FILE = "external_errata.csv"
#: the folder's name beside the dataset (version 1, ``brain-tumor-external``, is withdrawn: its
#: tumor slices were figshare's, mirrored)
DEFAULT_NAME = "brain-tumor-external-v2"


def default_external_dir(data: Path | None) -> Path | None:
    """``$NEUROCBIR_EXTERNAL``, else ``brain-tumor-external-v2`` beside the dataset folder, if present."""
    if os.environ.get(EXTERNAL_ENV):
        return Path(os.environ[EXTERNAL_ENV])
    cand = Path(data).parent / DEFAULT_NAME if data is not None else None
    return cand if cand is not None and (cand / "metadata.csv").is_file() else None


@dataclass
class ExternalCases:
    """The slices of one folder: files, labels (names from :data:`LABELS`), groups, and where
    given their source, patient, slice number and mask file ('' where absent)."""

    root: Path
    files: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    sources: np.ndarray
    patients: np.ndarray
    slices: np.ndarray
    mask_files: np.ndarray

    def __len__(self) -> int:
        return len(self.files)

    @property
    def tumor(self) -> np.ndarray:
        """Which slices show a tumor (of a known type or not)."""
        return self.labels != NO_TUMOR

    @property
    def label_index(self) -> np.ndarray:
        """Tumor type as an index into :data:`CLASS_NAMES` (-1 for no tumor, or a type not given)."""
        return np.array([CLASS_NAMES.index(v) if v in CLASS_NAMES else -1 for v in self.labels])

    @property
    def case_label(self) -> np.ndarray:
        """The label as an index into :data:`CASE_LABELS`."""
        return np.array([CASE_LABELS.index(v) for v in self.labels])

    def path(self, i: int) -> Path:
        return self.root / str(self.files[i])

    def load_image(self, i: int) -> np.ndarray:
        return read_gray(self.path(i))

    def has_mask(self, i: int) -> bool:
        """Is the tumor mask known: given as a file, or empty because the slice shows no tumor."""
        return bool(self.mask_files[i]) or self.labels[i] == NO_TUMOR

    def load_mask(self, i: int) -> np.ndarray | None:
        """The slice's tumor mask (bool, the image's shape), empty for a no-tumor slice without
        one; None where it is not known."""
        if self.mask_files[i]:
            mask = read_gray(self.root / str(self.mask_files[i])) >= 128
            return mask
        if self.labels[i] == NO_TUMOR:
            return np.zeros(self.load_image(i).shape, dtype=bool)
        return None

    def subset(self, rows: np.ndarray) -> ExternalCases:
        rows = np.asarray(rows)
        return ExternalCases(self.root, *(getattr(self, f.name)[rows] for f in fields(self)[1:]))


def is_external_layout(root: Path | str) -> bool:
    """A folder whose metadata.csv names images by ``image_file`` and labels by ``label_name``,
    with no patient-wise folds (the bundled figshare layout has both, and ``cvind_fold``)."""
    meta = Path(root) / "metadata.csv"
    if not meta.is_file():
        return False
    with meta.open(newline="", encoding="utf-8-sig") as fh:
        header = next(csv.reader(fh), [])
    return {"image_file", "label_name"} <= set(header) and "cvind_fold" not in header


def _inside(root: Path, meta: Path, n: int, name: str, column: str) -> str:
    if name and not (root / name).resolve().is_relative_to(root.resolve()):
        raise DatasetError(f"{meta}, line {n}: {column} {name!r} is not a file inside {root}")
    return name


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
    cols: dict[str, list[str]] = {k: [] for k in ("files", "labels", "groups", *OPTIONAL)}
    for n, r in enumerate(rows, 2):
        label = (r.get("label_name") or "").strip().lower()
        if label not in LABELS:
            raise DatasetError(
                f"{meta}, line {n}: label_name {r.get('label_name')!r} is not one of {', '.join(LABELS)}"
            )
        name = (r.get("image_file") or "").strip()
        if not name:
            raise DatasetError(f"{meta}, line {n}: no image_file")
        cols["files"].append(_inside(root, meta, n, name, "image_file"))
        cols["labels"].append(label)
        cols["groups"].append((r.get("group") or "").strip() or f"row{n}")  # no group: the slice is its own
        for k in OPTIONAL:
            value = (r.get(k) or "").strip()
            cols[k].append(_inside(root, meta, n, value, k) if k.endswith("_file") else value)
    return ExternalCases(
        root,
        *(np.array(cols[k]) for k in ("files", "labels", "groups")),
        np.array(cols["source"]),
        np.array(cols["patient"]),
        np.array(cols["slice"]),
        np.array(cols["mask_file"]),
    )


def development_split(
    cases: ExternalCases, validation_share: float = VALIDATION_SHARE, seed: int = SPLIT_SEED, errata: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(development rows, validation rows): whole groups on one side (a TCGA patient's series, a
    set of near-duplicates), each source's labels in about the same share on both (scikit-learn's
    StratifiedGroupKFold; a fixed seed, so the split is the same everywhere). The split is made on
    every slice; then, with ``errata``, the folder's known figshare copies leave both parts and its
    validation slices with a twin in the development part leave the validation part."""
    n_splits = max(2, round(1 / validation_share))
    dev, val = group_folds(cases, n_splits, seed)[0]
    dev, val = np.sort(dev), np.sort(val)
    if not errata:
        return dev, val
    copies, twins = errata_of(cases)
    return dev[~copies[dev]], val[~(copies | twins)[val]]


def group_folds(cases: ExternalCases, n_splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's StratifiedGroupKFold over ``cases``: whole groups, each source's labels (the
    strata) in about the same share in every fold. A stratum smaller than the folds (Kaggle's one
    glioma) cannot be in all of them: expected here, so not warned about."""
    from sklearn.model_selection import StratifiedGroupKFold

    strata = np.char.add(np.char.add(cases.sources.astype(str), ":"), cases.labels.astype(str))
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The least populated class in y", UserWarning)
        return list(cv.split(np.zeros(len(cases)), strata, groups=cases.groups))


def errata_of(cases: ExternalCases) -> tuple[np.ndarray, np.ndarray]:
    """(figshare copies, validation twins of development slices): boolean masks over ``cases``
    from :data:`ERRATA_FILE`, for the folder of the same name."""
    from importlib import resources

    copies, twins = np.zeros(len(cases), bool), np.zeros(len(cases), bool)
    text = resources.files("neurocbir.data").joinpath(ERRATA_FILE)
    if not text.is_file():
        return copies, twins
    row_of = {str(f): i for i, f in enumerate(cases.files)}
    with text.open(newline="") as fh:
        for r in csv.DictReader(fh):
            if r["dataset"] == Path(cases.root).name and r["image_file"] in row_of:
                (copies if r["kind"] == "figshare" else twins)[row_of[r["image_file"]]] = True
    return copies, twins


def part(cases: ExternalCases, name: str, errata: bool = True) -> ExternalCases:
    """One side of :func:`development_split` by name (:data:`PARTS`)."""
    if name not in PARTS:
        raise InvalidInput(f"part must be one of {', '.join(PARTS)}, got {name!r}")
    return cases.subset(development_split(cases, errata=errata)[PARTS.index(name)])
