"""Reading a user's scan: PNG / JPEG, DICOM or a figshare ``.mat`` file, from bytes.

Every failure is an :class:`UploadError` with a message a clinician can act on; nothing is
written to disk (the ``.mat`` reader uses an in-memory HDF5 file).
"""

from __future__ import annotations

import io

import numpy as np

from neurocbir.errors import InvalidInput

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 25_000_000  # 5000x5000; far beyond any MRI slice, stops decompression bombs
MAX_DECODED_BYTES = 64 * 1024 * 1024  # one decoded slice (or an inflated DICOM dataset) at most
MAX_FRAMES = 512  # a multi-frame DICOM larger than any MRI series: upload one slice instead


class UploadError(InvalidInput):
    """The uploaded file cannot be used as a scan."""


def _check_pixels(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3:
        arr = arr[..., :3].mean(axis=-1) if arr.shape[-1] in (3, 4) else arr[..., 0]
    if arr.ndim != 2:
        raise UploadError(f"the image must be a 2-D slice, got an array of shape {arr.shape}")
    if min(arr.shape) < 32:
        raise UploadError(f"the image is too small ({arr.shape[1]}x{arr.shape[0]} pixels; at least 32x32)")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise UploadError("the image has NaN or infinite pixel values")
    return arr


def _read_raster(data: bytes) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise UploadError(
                    f"the image is {im.width}x{im.height} pixels; the limit is {MAX_PIXELS // 1_000_000} megapixels"
                )
            im.load()
            if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit grayscale: keep every level
                return np.asarray(im, dtype=np.float32)
            return np.asarray(im.convert("L"))
    except UploadError:
        raise
    except UnidentifiedImageError:
        raise UploadError("not a readable image: upload a PNG or JPEG, a DICOM file or a figshare .mat file") from None
    except Image.DecompressionBombError:
        raise UploadError(f"the image is larger than {MAX_PIXELS // 1_000_000} megapixels") from None
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, struct.error...) on bad data
        raise UploadError(f"the image file is corrupt or truncated ({type(exc).__name__}: {exc})") from None


def _check_deflated(data: bytes) -> None:
    """pydicom inflates a deflated dataset whole inside ``dcmread``, before any check: inflate it
    here first, bounded, so a small file cannot expand to gigabytes."""
    import zlib

    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    fp = io.BytesIO(data)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    inflate = zlib.decompressobj(-zlib.MAX_WBITS)
    inflate.decompress(data[fp.tell() :], MAX_DECODED_BYTES)
    if inflate.unconsumed_tail:
        raise UploadError(f"the deflated DICOM file expands to more than {MAX_DECODED_BYTES // 2**20} MB", status=413)


def _read_dicom(data: bytes) -> tuple[np.ndarray, tuple[float, float] | None]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        _check_deflated(data)
        ds = pydicom.dcmread(io.BytesIO(data))  # pixel data stays encoded until asked for
    except UploadError:
        raise
    except InvalidDicomError as exc:
        raise UploadError(f"not a DICOM file ({exc})") from None
    except Exception as exc:  # truncated or corrupt files raise many types inside pydicom
        raise UploadError(f"the DICOM file is corrupt or truncated ({type(exc).__name__})") from None
    return dataset_pixels(ds)


def dataset_pixels(ds) -> tuple[np.ndarray, tuple[float, float] | None]:
    """One slice of a parsed DICOM dataset (a file or a PACS's WADO-RS answer) and its pixel
    spacing, sizes checked before the pixel data is decoded."""
    from pydicom.pixels import pixel_array

    try:
        has_pixels = "PixelData" in ds
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        per_frame = (
            rows * cols * int(ds.get("SamplesPerPixel", 1) or 1) * max(int(ds.get("BitsAllocated", 8) or 8), 8) // 8
        )
        inverted = str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1"
        spacing = _pixel_spacing(ds)
    except Exception as exc:  # corrupt elements raise many types inside pydicom
        raise UploadError(f"the DICOM file is corrupt or truncated ({type(exc).__name__})") from None
    if not has_pixels:
        raise UploadError("the DICOM file has no pixel data (is it a structured report or a header-only file?)")
    if rows * cols > MAX_PIXELS or per_frame > MAX_DECODED_BYTES:
        raise UploadError(f"the DICOM image is {cols}x{rows} pixels; the limit is {MAX_PIXELS // 1_000_000} megapixels")
    if frames > MAX_FRAMES:
        raise UploadError(f"the DICOM file holds {frames} frames; upload one slice (at most {MAX_FRAMES} frames)")
    try:  # decode one frame only: the middle slice of a multi-frame file
        arr = pixel_array(ds, index=frames // 2 if frames > 1 else None)
    except Exception as exc:  # pydicom raises many types for bad or unsupported pixel data
        raise UploadError(f"the DICOM pixel data cannot be decoded ({type(exc).__name__}: {exc})") from None
    if inverted:  # MONOCHROME1: low values are bright
        arr = arr.max() + arr.min() - arr.astype(np.float32)
    return _check_pixels(np.asarray(arr)), spacing


def _pixel_spacing(ds) -> tuple[float, float] | None:
    """(row, column) spacing in mm from PixelSpacing (or ImagerPixelSpacing); None when absent
    or implausible."""
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(tag)
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if 0.01 <= row <= 10 and 0.01 <= col <= 10:
            return row, col
    return None


def _read_mat(data: bytes) -> np.ndarray:
    import h5py

    try:
        with h5py.File(io.BytesIO(data), "r") as f:
            if not isinstance(f.get("cjdata", getlink=True), h5py.HardLink) or not isinstance(
                f["cjdata"].get("image", getlink=True), h5py.HardLink
            ):  # an external or soft link would open other files on the server
                raise UploadError(
                    "the .mat file has no cjdata.image: expected a file of the figshare brain tumor release"
                )
            ds = f["cjdata"]["image"]
            if not isinstance(ds, h5py.Dataset) or ds.is_virtual or ds.ndim != 2:
                raise UploadError("the .mat file's cjdata.image is not a 2-D image stored in the file")
            if ds.dtype.kind not in "iuf" or ds.size > MAX_PIXELS or ds.size * ds.dtype.itemsize > MAX_DECODED_BYTES:
                raise UploadError(f"the .mat image ({ds.shape}, {ds.dtype}) is too large or not numeric")
            unknown = set(ds._filters) - {"gzip", "shuffle", "fletcher32"}  # what MATLAB writes
            if unknown:
                raise UploadError(f"the .mat image uses unsupported HDF5 filters {sorted(unknown)}")
            return np.asarray(ds).T
    except UploadError:
        raise
    except OSError:
        raise UploadError("the .mat file is not MATLAB v7.3 (HDF5); save it with -v7.3 or export a PNG") from None
    except Exception as exc:  # h5py raises RuntimeError, KeyError... on corrupt files
        raise UploadError(f"the .mat file is corrupt ({type(exc).__name__})") from None


def read_scan(data: bytes, filename: str = "") -> np.ndarray:
    """Decode an uploaded scan to a float32 (H, W) array."""
    return read_scan_with_spacing(data, filename)[0]


def read_scan_with_spacing(data: bytes, filename: str = "") -> tuple[np.ndarray, tuple[float, float] | None]:
    """The decoded scan and its (row, column) pixel spacing in mm when the file states one
    (DICOM); None for PNG, JPEG and .mat."""
    if not data:
        raise UploadError("the uploaded file is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadError(
            f"the file is {len(data) / 1e6:.1f} MB; the limit is {MAX_UPLOAD_BYTES // (1024 * 1024)} MB", status=413
        )
    name = filename.lower()
    if name.endswith(".mat") or data[:8] == b"\x89HDF\r\n\x1a\n" or data[512:520] == b"\x89HDF\r\n\x1a\n":
        arr, spacing = _read_mat(data), None
    elif name.endswith((".dcm", ".dicom")) or data[128:132] == b"DICM":
        arr, spacing = _read_dicom(data)
    else:
        arr, spacing = _read_raster(data), None
    return _check_pixels(np.asarray(arr)), spacing
