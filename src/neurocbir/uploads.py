"""Reading a user's scan: PNG / JPEG, DICOM or a figshare ``.mat`` file, from bytes.

Every failure is an :class:`UploadError` with a message a clinician can act on; nothing is
written to disk (the ``.mat`` reader uses an in-memory HDF5 file).
"""

from __future__ import annotations

import io

import numpy as np

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 25_000_000  # 5000x5000; far beyond any MRI slice, stops decompression bombs


class UploadError(ValueError):
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
            return np.asarray(im.convert("L"))
    except UploadError:
        raise
    except UnidentifiedImageError:
        raise UploadError("not a readable image: upload a PNG or JPEG, a DICOM file or a figshare .mat file") from None
    except Image.DecompressionBombError:
        raise UploadError(f"the image is larger than {MAX_PIXELS // 1_000_000} megapixels") from None
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, struct.error...) on bad data
        raise UploadError(f"the image file is corrupt or truncated ({type(exc).__name__}: {exc})") from None


def _read_dicom(data: bytes) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError as exc:
        raise UploadError(f"not a DICOM file ({exc})") from None
    except Exception as exc:  # truncated or corrupt files raise many types inside pydicom
        raise UploadError(f"the DICOM file is corrupt or truncated ({type(exc).__name__})") from None
    try:
        has_pixels = "PixelData" in ds
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except Exception as exc:  # pydicom parses elements lazily
        raise UploadError(f"the DICOM file is corrupt ({type(exc).__name__})") from None
    if not has_pixels:
        raise UploadError("the DICOM file has no pixel data (is it a structured report or a header-only file?)")
    if rows * cols > MAX_PIXELS:
        raise UploadError(f"the DICOM image is {cols}x{rows} pixels; the limit is {MAX_PIXELS // 1_000_000} megapixels")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for bad or unsupported pixel data
        raise UploadError(f"the DICOM pixel data cannot be decoded ({exc})") from None
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        arr = arr[arr.shape[0] // 2]  # a multi-frame file: take the middle slice
    return arr


def _read_mat(data: bytes) -> np.ndarray:
    import h5py

    try:
        with h5py.File(io.BytesIO(data), "r") as f:
            if "cjdata" not in f or "image" not in f["cjdata"]:
                raise UploadError(
                    "the .mat file has no cjdata.image: expected a file of the figshare brain tumor release"
                )
            ds = f["cjdata"]["image"]
            if int(np.prod(ds.shape)) > MAX_PIXELS:
                raise UploadError("the .mat image is too large")
            return np.asarray(ds).T
    except UploadError:
        raise
    except OSError:
        raise UploadError("the .mat file is not MATLAB v7.3 (HDF5); save it with -v7.3 or export a PNG") from None
    except Exception as exc:  # h5py raises RuntimeError, KeyError... on corrupt files
        raise UploadError(f"the .mat file is corrupt ({type(exc).__name__})") from None


def read_scan(data: bytes, filename: str = "") -> np.ndarray:
    """Decode an uploaded scan to a float32 (H, W) array."""
    if not data:
        raise UploadError("the uploaded file is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadError(f"the file is {len(data) / 1e6:.1f} MB; the limit is {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
    name = filename.lower()
    if name.endswith(".mat") or data[:8] == b"\x89HDF\r\n\x1a\n" or data[512:520] == b"\x89HDF\r\n\x1a\n":
        arr = _read_mat(data)
    elif name.endswith((".dcm", ".dicom")) or data[128:132] == b"DICM":
        arr = _read_dicom(data)
    else:
        arr = _read_raster(data)
    return _check_pixels(np.asarray(arr))
