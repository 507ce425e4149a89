"""Dataset layer: the Cheng et al. brain tumor MRI cases, from the bundled folder or the
original figshare release (MATLAB v7.3 ``.mat`` files), with patient-wise folds.

Image I/O lives here and in :mod:`neurocbir.data.transforms`, apart from the models (MONAI style).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neurocbir.errors import InvalidInput

CLASS_NAMES: tuple[str, ...] = ("meningioma", "glioma", "pituitary")
#: a slice without a tumor: an archive may hold such cases (label index 3), never a tumor type
NO_TUMOR = "notumor"
#: a tumor whose type was not given (e.g. Br35H): evidence that there is a tumor, never of its type
TUMOR_UNTYPED = "tumor"
#: what an archive case can be labelled: a tumor type (0-2), no tumor (3), or a tumor of unknown type (4)
CASE_LABELS: tuple[str, ...] = (*CLASS_NAMES, NO_TUMOR, TUMOR_UNTYPED)
NO_TUMOR_LABEL = CASE_LABELS.index(NO_TUMOR)
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")
#: In-plane pixel area on the 512x512 grid (0.49 mm x 0.49 mm, Cheng et al. 2015).
PIXEL_AREA_MM2_512 = 0.49 * 0.49
DATA_ENV = "NEUROCBIR_DATA"
DEFAULT_TEST_FOLD = 5


class DatasetError(InvalidInput):
    """A dataset file is missing or not in the expected layout."""


@dataclass
class CaseTable:
    """All cases of a source as parallel arrays; images are loaded lazily by ``load_image``.

    ``label`` is 0-based (index into :data:`CLASS_NAMES`); ``plane`` is '' when unknown.
    """

    idx: np.ndarray
    label: np.ndarray
    patient_id: np.ndarray
    fold: np.ndarray
    plane: np.ndarray
    area_mm2: np.ndarray
    loader: ImageSource = field(repr=False)

    def __len__(self) -> int:
        return len(self.idx)

    def subset(self, selector: np.ndarray | Sequence[int]) -> CaseTable:
        sel = np.asarray(selector)
        return CaseTable(
            self.idx[sel],
            self.label[sel],
            self.patient_id[sel],
            self.fold[sel],
            self.plane[sel],
            self.area_mm2[sel],
            self.loader,
        )

    def split(self, test_fold: int = DEFAULT_TEST_FOLD) -> tuple[CaseTable, CaseTable]:
        """Patient-wise train/test split on the dataset's own ``cvind`` folds."""
        if test_fold not in set(self.fold.tolist()):
            raise DatasetError(f"fold {test_fold} has no cases (folds present: {sorted(set(self.fold.tolist()))})")
        test = self.fold == test_fold
        return self.subset(np.flatnonzero(~test)), self.subset(np.flatnonzero(test))

    def load_image(self, i: int) -> np.ndarray:
        """Image of row ``i`` as float32 (H, W), native intensities."""
        return self.loader.load_image(int(self.idx[i]))

    def load_mask(self, i: int) -> np.ndarray:
        return self.loader.load_mask(int(self.idx[i]))


class ImageSource:
    """Where pixels come from; subclasses read one storage layout."""

    name = "abstract"

    def load_image(self, idx: int) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def load_mask(self, idx: int) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def image_path(self, idx: int) -> Path:  # pragma: no cover - interface
        """The file that holds case ``idx``'s image."""
        raise NotImplementedError


def read_gray(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DatasetError(f"missing image file: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), dtype=np.float32)
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from None


class FolderSource(ImageSource):
    """The bundled copy: ``metadata.csv`` + ``images/{idx}.jpg`` + ``masks/{idx}.png``."""

    name = "folder"

    def __init__(self, root: Path):
        self.root = Path(root)

    def image_path(self, idx: int) -> Path:
        return self.root / "images" / f"{idx}.jpg"

    def load_image(self, idx: int) -> np.ndarray:
        return read_gray(self.image_path(idx))

    def load_mask(self, idx: int) -> np.ndarray:
        return read_gray(self.root / "masks" / f"{idx}.png") > 127

    def table(self) -> CaseTable:
        meta = self.root / "metadata.csv"
        if not meta.is_file():
            raise DatasetError(f"{self.root} has no metadata.csv: not a neurocbir dataset folder")
        required = {"idx", "label", "pid", "cvind_fold", "plane", "mask_area_px"}
        with meta.open(newline="") as fh:
            reader = csv.DictReader(fh)
            missing = required - set(reader.fieldnames or [])
            if missing:
                raise DatasetError(f"{meta} lacks columns {sorted(missing)}")
            rows = list(reader)
        if not rows:
            raise DatasetError(f"{meta} has no rows")
        try:
            return CaseTable(
                idx=np.array([int(r["idx"]) for r in rows]),
                label=np.array([int(r["label"]) - 1 for r in rows]),
                patient_id=np.array([r["pid"] for r in rows]),
                fold=np.array([int(r["cvind_fold"]) for r in rows]),
                plane=np.array([r["plane"] for r in rows]),
                area_mm2=np.array([float(r["mask_area_px"]) * PIXEL_AREA_MM2_512 for r in rows]),
                loader=self,
            )
        except ValueError as exc:
            raise DatasetError(f"{meta}: malformed value ({exc})") from None


class FigshareSource(ImageSource):
    """The original figshare release: ``{idx}.mat`` (v7.3 ``cjdata`` struct) + ``cvind.mat``.

    The release has no anatomical plane; pass ``planes`` (idx -> plane) to add it.
    """

    name = "figshare"

    def __init__(self, root: Path, planes: dict[int, str] | None = None):
        self.root = Path(root)
        self.planes = planes or {}

    def image_path(self, idx: int) -> Path:
        return self.root / f"{idx}.mat"

    def _cjdata(self, idx: int) -> dict:
        import h5py

        path = self.image_path(idx)
        if not path.is_file():
            raise DatasetError(f"missing figshare file: {path}")
        try:
            with h5py.File(path, "r") as f:
                if "cjdata" not in f:
                    raise DatasetError(f"{path}: no 'cjdata' struct (keys: {sorted(f.keys())})")
                g = f["cjdata"]
                need = ("label", "PID", "image", "tumorMask")
                missing = [k for k in need if k not in g]
                if missing:
                    raise DatasetError(f"{path}: cjdata lacks fields {missing}")
                return {
                    "label": int(np.asarray(g["label"]).ravel()[0]),
                    # MATLAB stores char arrays as uint16 code points.
                    "pid": "".join(chr(int(c)) for c in np.asarray(g["PID"]).ravel()),
                    # MATLAB is column-major: h5py sees the transpose.
                    "image": np.asarray(g["image"], dtype=np.float32).T,
                    "mask": np.asarray(g["tumorMask"]).T > 0,
                }
        except DatasetError:
            raise
        except OSError as exc:
            raise DatasetError(f"{path}: not a MATLAB v7.3 (HDF5) file ({exc})") from None
        except Exception as exc:  # h5py raises RuntimeError, KeyError... on corrupt files
            raise DatasetError(f"{path}: corrupt MATLAB file ({type(exc).__name__}: {exc})") from None

    def load_image(self, idx: int) -> np.ndarray:
        return self._cjdata(idx)["image"]

    def load_mask(self, idx: int) -> np.ndarray:
        return self._cjdata(idx)["mask"]

    def table(self) -> CaseTable:
        import h5py

        cv = self.root / "cvind.mat"
        if not cv.is_file():
            raise DatasetError(f"{self.root} has no cvind.mat (the patient-wise fold file)")
        try:
            with h5py.File(cv, "r") as f:
                if "cvind" not in f:
                    raise DatasetError(f"{cv}: no 'cvind' variable")
                folds = np.asarray(f["cvind"]).ravel().astype(int)
        except OSError as exc:
            raise DatasetError(f"{cv}: not a MATLAB v7.3 (HDF5) file ({exc})") from None
        idx, label, pid, area = [], [], [], []
        from tqdm import tqdm

        for i in tqdm(range(1, len(folds) + 1), desc="reading .mat files", unit="file", leave=False):
            d = self._cjdata(i)
            if d["label"] not in (1, 2, 3):
                raise DatasetError(f"{i}.mat: label {d['label']} is not 1, 2 or 3")
            idx.append(i)
            label.append(d["label"] - 1)
            pid.append(d["pid"])
            # Area on the 512 grid: scale pixel counts of 256x256 originals by 4.
            scale = (512 / d["mask"].shape[0]) ** 2
            area.append(float(d["mask"].sum()) * scale * PIXEL_AREA_MM2_512)
        return CaseTable(
            idx=np.array(idx),
            label=np.array(label),
            patient_id=np.array(pid),
            fold=folds,
            plane=np.array([self.planes.get(i, "") for i in idx]),
            area_mm2=np.array(area),
            loader=self,
        )


def default_data_dir() -> Path | None:
    """``$NEUROCBIR_DATA``, else the shared folder beside the checkout, else ``None``."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent.parent / "shared" / "data" / "brain-tumor-figshare"
        if cand.is_dir():
            return cand
    cand = Path.cwd().parent / "shared" / "data" / "brain-tumor-figshare"
    return cand if cand.is_dir() else None


def load_cases(root: Path | str | None = None) -> CaseTable:
    """Load a dataset folder of either layout (detected from its files)."""
    path = Path(root) if root is not None else default_data_dir()
    if path is None:
        raise DatasetError(
            f"no dataset found: pass --data PATH or set {DATA_ENV} to a folder holding either "
            "metadata.csv + images/ (bundled layout) or 1.mat..3064.mat + cvind.mat (figshare)"
        )
    if not path.is_dir():
        raise DatasetError(f"dataset folder does not exist: {path}")
    if (path / "metadata.csv").is_file():
        return FolderSource(path).table()
    if (path / "cvind.mat").is_file():
        return FigshareSource(path).table()
    raise DatasetError(f"{path} holds neither metadata.csv (bundled layout) nor cvind.mat (figshare release)")


def mask_for_image(path: Path | str) -> np.ndarray | None:
    """The tumor mask that goes with an image file of a dataset layout (``images/N.jpg`` beside
    ``masks/N.png``: the bundled folder, or other hospitals' TCGA slices, whose masks outline the
    FLAIR abnormality; or a figshare ``N.mat``), or None when the layout has none."""
    path = Path(path)
    if not path.stem.isdigit():
        return None
    try:
        if path.suffix == ".mat":
            return FigshareSource(path.parent).load_mask(int(path.stem))
        mask = path.parent.parent / "masks" / f"{path.stem}.png"  # the stem as written: 00074 or 74
        if path.parent.name == "images" and mask.is_file():
            return read_gray(mask) > 127
    except (ValueError, OSError):  # DatasetError is a ValueError
        return None
    return None


def grouped_inner_folds(table: CaseTable, n_splits: int = 3, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Patient-grouped CV inside a training set (for hyper-parameter search)."""
    from sklearn.model_selection import StratifiedGroupKFold

    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(cv.split(np.zeros(len(table)), table.label, groups=table.patient_id))
