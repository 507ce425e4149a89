"""Reading a whole series: several uploaded slices (DICOM, PNG/JPEG, figshare ``.mat``), one
multi-frame or enhanced DICOM, or a NIfTI volume (``.nii`` / ``.nii.gz``, read by nibabel: its
axial slices), checked and in anatomical order.

DICOM slices are ordered by their position along the slice normal (ImagePositionPatient projected
on the normal of ImageOrientationPatient), else by InstanceNumber; slices of different series in
one request are refused. The upload limits hold per study: the number of slices, the bytes and
the decoded pixels. The parsed DICOM headers are kept (no pixel copies beyond the slices), so
results can go back to the PACS as DICOM SEG and SR referencing the source instances."""

from __future__ import annotations

import gzip
import io
import zlib
from dataclasses import dataclass, field

import numpy as np

from neurocbir.data.uploads import MAX_UPLOAD_BYTES, UploadError, _check_pixels, read_scan_with_spacing

MAX_STUDY_SLICES = 512
MAX_STUDY_BYTES = 256 * 1024 * 1024
MAX_STUDY_PIXELS = 512 * 512 * 512  # decoded, over the whole study


@dataclass
class StudySlice:
    pixels: np.ndarray  # (H, W) float32
    spacing_mm: tuple[float, float] | None  # (row, column)
    name: str
    position_mm: float | None = None  # along the slice normal
    instance: int | None = None
    dataset: object | None = None  # the source pydicom Dataset (header only is needed)
    frame: int | None = None  # of a multi-frame source, 1-based


@dataclass
class Study:
    slices: list[StudySlice]
    kind: str  # "dicom", "nifti" or "images"
    slice_spacing_mm: float | None = None
    series_uid: str | None = None
    notes: list[str] = field(default_factory=list)


def _is_nifti(data: bytes, name: str) -> bool:
    n = name.lower()
    return (
        n.endswith((".nii", ".nii.gz"))
        or data[:2] == b"\x1f\x8b"
        and n.endswith(".gz")
        or data[344:348] in (b"n+1\x00", b"ni1\x00")
    )


def _read_nifti(data: bytes, name: str) -> Study:
    import nibabel as nib

    if data[:2] == b"\x1f\x8b":  # gzip: inflate, bounded
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as fh:
                data = fh.read(MAX_STUDY_BYTES + 1)
        except (OSError, EOFError, zlib.error) as exc:
            raise UploadError(f"{name}: not a readable NIfTI volume (a corrupt gzip file: {exc})") from None
        if len(data) > MAX_STUDY_BYTES:
            raise UploadError(
                f"{name}: the NIfTI volume inflates to more than {MAX_STUDY_BYTES // 2**20} MB", status=413
            )
    try:
        img = nib.Nifti1Image.from_bytes(data)
        shape = img.header.get_data_shape()
        if len(shape) < 3 or int(np.prod(shape[:3])) > MAX_STUDY_PIXELS:
            raise UploadError(f"{name}: expected a 3-D volume of at most {MAX_STUDY_PIXELS} voxels, got {shape}")
        img = nib.as_closest_canonical(img)  # RAS: the third axis runs inferior to superior (axial slices)
        vol = np.asarray(img.dataobj, dtype=np.float32)
        zooms = img.header.get_zooms()
    except UploadError:
        raise
    except Exception as exc:  # nibabel raises many types on a bad header or data
        raise UploadError(f"{name}: not a readable NIfTI volume ({type(exc).__name__}: {exc})") from None
    if vol.ndim > 3:
        vol = vol[..., 0]
    if vol.shape[2] > MAX_STUDY_SLICES:
        raise UploadError(f"{name}: {vol.shape[2]} axial slices; at most {MAX_STUDY_SLICES} per study")
    slices = []
    for z in range(vol.shape[2]):
        # RAS (x right, y anterior) to the radiological view: rows anterior to posterior, columns right to left
        shown = np.flipud(vol[:, :, z].T)[:, ::-1]
        slices.append(
            StudySlice(_check_pixels(shown), (float(zooms[1]), float(zooms[0])), f"{name}[{z}]", float(z * zooms[2]))
        )
    return Study(slices, "nifti", float(zooms[2]), notes=["NIfTI: axial slices of the volume, reoriented to RAS"])


def _dicom_slices(data: bytes, name: str) -> list[StudySlice]:
    import pydicom

    from neurocbir.data.uploads import _check_deflated

    try:
        _check_deflated(data)
        ds = pydicom.dcmread(io.BytesIO(data))
    except UploadError:
        raise
    except Exception as exc:
        raise UploadError(f"{name}: not a readable DICOM file ({type(exc).__name__})") from None
    return dataset_slices(ds, name)


def _attr(ds, name: str):
    """An attribute's value, or None when it is absent or cannot be decoded at all."""
    try:
        return ds.get(name)
    except (ValueError, TypeError, OverflowError):
        return None


def _numbers(value, n: int) -> np.ndarray | None:
    """``n`` finite numbers from a DICOM value, or None when it is absent or malformed (a broken
    exporter's geometry is then ignored, as if absent)."""
    if value is None:
        return None
    try:
        arr = np.asarray([value] if isinstance(value, (str, bytes, int, float)) else list(value), float)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.isfinite(arr).all() else None


def _header_int(ds, name: str, default: int | None, file: str) -> int | None:
    """An integer attribute; a malformed one is a clear error."""
    value = _attr(ds, name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UploadError(f"{file}: the DICOM attribute {name} is not an integer ({str(value)[:20]!r})") from None


def dataset_slices(ds, name: str) -> list[StudySlice]:
    """The slices of one parsed DICOM dataset (one, or each frame of a multi-frame image)."""
    from pydicom.pixels import pixel_array

    from neurocbir.data.uploads import _pixel_spacing

    if "PixelData" not in ds:
        raise UploadError(f"{name}: the DICOM file has no pixel data")
    frames = _header_int(ds, "NumberOfFrames", 1, name) or 1
    rows, cols = _header_int(ds, "Rows", 0, name), _header_int(ds, "Columns", 0, name)
    if frames > MAX_STUDY_SLICES or rows * cols * frames > MAX_STUDY_PIXELS:
        raise UploadError(f"{name}: {frames} frames of {cols}x{rows}: more than a study may hold")
    try:
        arr = np.asarray(pixel_array(ds), dtype=np.float32)
    except Exception as exc:
        raise UploadError(f"{name}: the DICOM pixel data cannot be decoded ({type(exc).__name__})") from None
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        arr = arr.max() + arr.min() - arr
    arr = arr.reshape(frames, rows, cols) if frames > 1 else arr.reshape(1, rows, cols)
    spacing = _pixel_spacing(ds)
    out = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    for f in range(frames):
        position, orientation = _attr(ds, "ImagePositionPatient"), _attr(ds, "ImageOrientationPatient")
        if per_frame is not None and f < len(per_frame):  # an enhanced multi-frame image: each frame's own
            item = per_frame[f]
            if "PlanePositionSequence" in item:
                position = item.PlanePositionSequence[0].get("ImagePositionPatient", position)
        shared = ds.get("SharedFunctionalGroupsSequence")
        if orientation is None and shared and "PlaneOrientationSequence" in shared[0]:
            orientation = shared[0].PlaneOrientationSequence[0].get("ImageOrientationPatient")
        along, position, orientation = None, _numbers(position, 3), _numbers(orientation, 6)
        if position is not None and orientation is not None:
            along = float(np.dot(np.cross(orientation[:3], orientation[3:]), position))
        inst = _numbers(_attr(ds, "InstanceNumber"), 1)
        out.append(
            StudySlice(
                _check_pixels(arr[f]),
                spacing,
                name if frames == 1 else f"{name}[{f + 1}]",
                along,
                int(inst[0]) if inst is not None else None,
                ds,
                f + 1 if frames > 1 else None,
            )
        )
    return out


def read_study(files: list[tuple[bytes, str]]) -> Study:
    """The study in ``files`` ((content, file name) each), its slices in anatomical order."""
    if not files:
        raise UploadError("the study has no files")
    if len(files) > MAX_STUDY_SLICES:
        raise UploadError(f"{len(files)} files; a study holds at most {MAX_STUDY_SLICES} slices")
    if sum(len(d) for d, _ in files) > MAX_STUDY_BYTES:
        raise UploadError(f"the study is larger than {MAX_STUDY_BYTES // 2**20} MB", status=413)
    for data, name in files:
        if not data:
            raise UploadError(f"{name or 'a file'}: the file is empty")
        if len(data) > MAX_UPLOAD_BYTES and not _is_nifti(data, name) and data[128:132] != b"DICM":
            raise UploadError(
                f"{name}: {len(data) / 1e6:.1f} MB; a slice is at most {MAX_UPLOAD_BYTES // 2**20} MB", status=413
            )
    if any(_is_nifti(d, n) for d, n in files):
        if len(files) > 1:
            raise UploadError("a NIfTI volume is a whole study: send it alone")
        return _read_nifti(*files[0])
    dicom = [(d, n) for d, n in files if d[128:132] == b"DICM" or n.lower().endswith((".dcm", ".dicom"))]
    if dicom and len(dicom) != len(files):
        raise UploadError("a study is DICOM slices or image files, not both")
    if not dicom:
        slices = []
        for data, name in files:
            pixels, spacing = read_scan_with_spacing(data, name)
            slices.append(StudySlice(pixels, spacing, name))
        return Study(slices, "images", notes=["image files: in the order they were sent; no slice spacing"])
    return dicom_study([s for d, n in dicom for s in _dicom_slices(d, n)])


def dicom_study(slices: list[StudySlice]) -> Study:
    """DICOM slices as one study: one series, in anatomical order, with the slice spacing."""
    if not slices:
        raise UploadError("the study has no slices")
    if len(slices) > MAX_STUDY_SLICES:
        raise UploadError(f"{len(slices)} slices; a study holds at most {MAX_STUDY_SLICES}")
    if sum(s.pixels.size for s in slices) > MAX_STUDY_PIXELS:
        raise UploadError(f"the study decodes to more than {MAX_STUDY_PIXELS} pixels")
    series = {str(s.dataset.get("SeriesInstanceUID", "")) for s in slices}
    if len(series) > 1:
        raise UploadError(f"the files belong to {len(series)} different series: send one series per study")
    if all(s.position_mm is not None for s in slices):
        slices.sort(key=lambda s: s.position_mm)
        gaps = np.diff([s.position_mm for s in slices])
        spacing = float(np.median(np.abs(gaps))) if len(gaps) else None
        spacing = spacing if spacing else None
    else:
        slices.sort(key=lambda s: (s.instance is None, s.instance or 0))
        ds = slices[0].dataset
        thickness = _numbers(_attr(ds, "SpacingBetweenSlices") or _attr(ds, "SliceThickness"), 1)
        spacing = float(thickness[0]) if thickness is not None and thickness[0] > 0 else None
    return Study(slices, "dicom", spacing, series.pop() or None)
