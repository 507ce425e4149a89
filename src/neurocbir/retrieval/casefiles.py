"""What a folder of scans (or a labels CSV) holds, before anything is embedded: one
:class:`CaseFile` per case, with its label, patient, plane, size and report, checked.

A folder is the bundled dataset layout, the figshare ``.mat`` release, or any folder of
PNG/JPEG/DICOM/.mat scans with a ``cases.csv``; the DICOMweb ingest
(:mod:`neurocbir.retrieval.dicomweb`) builds the same case files from a PACS."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neurocbir.data.cases import CASE_LABELS, CLASS_NAMES, NO_TUMOR, PLANES, TUMOR_UNTYPED, DatasetError, load_cases
from neurocbir.data.external import PARTS, development_split, is_external_layout, load_external
from neurocbir.retrieval.archive import ArchiveError


@dataclass
class CaseFile:
    """A case on disk before it is embedded."""

    path: Path
    label: int
    patient_id: str
    plane: str = ""
    area_mm2: float | None = None
    source_case: int | None = None
    report: str | None = None
    load: Callable[[], np.ndarray] | None = None
    key: str | None = None  # the archive's identity of the case; default: the file's SHA-256
    name: str | None = None  # how messages name it; default: the file name

    @property
    def shown_name(self) -> str:
        return self.name or self.path.name

    def pixels(self) -> np.ndarray:
        if self.load is not None:
            return self.load()
        from neurocbir.data.uploads import read_scan

        return read_scan(self.path.read_bytes(), self.path.name)


#: how a CSV may say that a slice shows no tumor
NO_TUMOR_WORDS = (NO_TUMOR, "no tumor", "no_tumor", "none", "normal")
#: how a CSV may say that a slice shows a tumor of a type not given (presence evidence only)
TUMOR_UNTYPED_WORDS = (TUMOR_UNTYPED, "tumour", "yes", "untyped")


def parse_label(value: str, where: str) -> int:
    """A label as an index into :data:`~neurocbir.data.cases.CASE_LABELS`: a tumor type (its
    name, or 1-3 as figshare numbers them), no tumor (3) or a tumor of a type not given (4)."""
    v = value.strip().lower()
    if v in CLASS_NAMES:
        return CLASS_NAMES.index(v)
    if v in NO_TUMOR_WORDS:
        return CASE_LABELS.index(NO_TUMOR)
    if v in TUMOR_UNTYPED_WORDS:
        return CASE_LABELS.index(TUMOR_UNTYPED)
    if v in ("1", "2", "3"):  # the figshare convention
        return int(v) - 1
    raise ArchiveError(
        f"{where}: label {value!r} is not one of {', '.join(CASE_LABELS)} (or 1, 2, 3 for the tumor types)"
    )


def scan_folder(folder: Path | str, folds: Iterable[int] | None = None, part: str | None = None) -> list[CaseFile]:
    """The cases of a folder: the bundled dataset layout, the figshare ``.mat`` release, or
    any folder of PNG/JPEG/DICOM/.mat scans with a ``cases.csv`` (columns ``file,label`` and
    optionally ``patient_id,plane,area_mm2,report``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArchiveError(f"no such folder: {folder}")
    if (folder / "cases.csv").is_file():
        return _scan_csv(folder)
    if is_external_layout(folder):
        return _scan_external(folder, part)
    if part is not None:
        raise ArchiveError(
            f"--part applies to a folder of other hospitals' slices (metadata.csv with image_file,label_name), not {folder}"
        )
    try:
        table = load_cases(folder)
    except DatasetError as exc:
        raise ArchiveError(
            f"{exc}; or put a cases.csv (file,label[,patient_id,plane,area_mm2,report]) beside the scans"
        ) from None
    keep = np.ones(len(table), bool) if folds is None else np.isin(table.fold, list(folds))
    loader = table.loader
    files = []
    for r in np.flatnonzero(keep):
        idx = int(table.idx[r])
        files.append(
            CaseFile(
                loader.image_path(idx),
                int(table.label[r]),
                str(table.patient_id[r]),
                str(table.plane[r]),
                float(table.area_mm2[r]),
                idx,
                load=lambda i=idx: loader.load_image(i),
            )
        )
    return files


def _scan_external(folder: Path, part: str | None = None) -> list[CaseFile]:
    """Other hospitals' slices (``metadata.csv``: ``image_file,label_name[,group,source,patient,...]``):
    a series' patient where given (TCGA), else a group of near-duplicate slices stands for one
    patient. ``part``: only the development or the validation part of the group-wise split
    (:func:`development_split`)."""
    try:
        cases = load_external(folder)
    except DatasetError as exc:
        raise ArchiveError(str(exc)) from None
    if part is not None:
        if part not in PARTS:
            raise ArchiveError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
        cases = cases.subset(development_split(cases)[PARTS.index(part)])
    return [
        CaseFile(
            cases.path(i),
            int(label),
            f"patient:{cases.sources[i]}:{cases.patients[i]}" if cases.patients[i] else f"group:{cases.groups[i]}",
        )
        for i, label in enumerate(cases.case_label)
    ]


def read_rows(path: Path, required: set[str], columns: str) -> list[tuple[str, dict]]:
    """(where, row) for each line of a UTF-8 CSV that has the ``required`` columns."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = required - set(reader.fieldnames or [])
            if missing:
                raise ArchiveError(f"{path} lacks columns {sorted(missing)} (expected {columns})")
            rows = list(reader)
    except OSError as exc:
        raise ArchiveError(f"cannot read {path} ({exc.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ArchiveError(f"{path} is not a UTF-8 CSV file ({exc})") from None
    out = []
    for n, r in enumerate(rows, 2):
        where = f"{path}, line {n}"
        if any(r.get(c) is None for c in required):
            raise ArchiveError(f"{where}: fewer values than columns")
        out.append((where, r))
    return out


def row_attributes(r: dict, where: str) -> tuple[int, str, float | None, str | None]:
    """The label, plane, tumor area and report of a CSV row, checked."""
    plane = (r.get("plane") or "").strip().lower()
    if plane and plane not in PLANES:
        raise ArchiveError(f"{where}: plane {plane!r} is not one of {', '.join(PLANES)}")
    try:
        area = float(r["area_mm2"]) if (r.get("area_mm2") or "").strip() else None
    except ValueError:
        raise ArchiveError(f"{where}: area_mm2 {r['area_mm2']!r} is not a number") from None
    return parse_label(r["label"], where), plane, area, r.get("report") or None


def _scan_csv(folder: Path) -> list[CaseFile]:
    files = []
    for where, r in read_rows(folder / "cases.csv", {"file", "label"}, "file,label[,patient_id,plane,area_mm2,report]"):
        try:
            f = (folder / r["file"]).resolve()
        except (ValueError, OSError):  # e.g. a NUL in the name
            raise ArchiveError(f"{where}: {r['file']!r} is not a file name") from None
        if not f.is_relative_to(folder.resolve()) or not f.is_file():
            raise ArchiveError(f"{where}: no file {r['file']!r} in {folder}")
        label, plane, area, report = row_attributes(r, where)
        files.append(CaseFile(f, label, (r.get("patient_id") or "").strip() or f.name, plane, area, report=report))
    return files
