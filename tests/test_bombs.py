"""Hostile uploads, built here: each gets a clear 4xx quickly and cannot blow up the server's
memory; and the odd-but-valid scans (16-bit PNG, MONOCHROME1 DICOM) read correctly."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import h5py
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from neurocbir.data.uploads import UploadError, read_scan


def _image_dataset(rows: int, cols: int, frames: int = 1, photometric: str = "MONOCHROME2") -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, generate_uid(), "MR"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


def _dicom_bytes(ds: Dataset, syntax=ExplicitVRLittleEndian) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def deflate_bomb(side: int = 16000) -> bytes:
    """A ~0.5 MB deflated DICOM whose dataset inflates to side x side x 16 bit (512 MB at 16000)."""
    header = _image_dataset(side, side)
    body = pydicom.filebase.DicomBytesIO()
    body.is_implicit_VR, body.is_little_endian = False, True  # explicit VR little endian, inside the deflate
    pydicom.filewriter.write_dataset(body, header)
    raw = body.getvalue()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = header.SOPClassUID, header.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(pydicom.filebase.DicomFileLike(out), meta, enforce_standard=True)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    n = side * side * 2
    pixel_tag = b"\xe0\x7f\x10\x00OW\0\0" + n.to_bytes(4, "little")
    out.write(deflate.compress(raw + pixel_tag))
    zeros = b"\0" * (1 << 24)
    for _ in range(n // len(zeros)):
        out.write(deflate.compress(zeros))
    out.write(deflate.compress(b"\0" * (n % len(zeros))) + deflate.flush())
    return out.getvalue()


def frames_dicom(frames: int = 1200, side: int = 64) -> bytes:
    ds = _image_dataset(side, side, frames)
    ds.PixelData = np.zeros((frames, side, side), np.uint16).tobytes()
    return _dicom_bytes(ds)


def _mat(build) -> bytes:
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        build(f, f.create_group("cjdata"))
    return buf.getvalue()


def mat_external_link() -> bytes:
    return _mat(lambda f, g: g.__setitem__("image", h5py.ExternalLink("/etc/hostname", "/image")))


def mat_virtual_dataset(tmp: Path) -> bytes:
    with h5py.File(tmp / "source.h5", "w") as src:
        src["x"] = np.zeros((512, 512), np.int16)
    layout = h5py.VirtualLayout(shape=(512, 512), dtype=np.int16)
    layout[:] = h5py.VirtualSource(str(tmp / "source.h5"), "x", shape=(512, 512))
    return _mat(lambda f, g: g.create_virtual_dataset("image", layout))


def mat_compression_bomb() -> bytes:
    """5000 x 5000 float64 zeros, gzip: a few hundred kB that inflate to 200 MB."""
    return _mat(
        lambda f, g: g.create_dataset(
            "image", shape=(5000, 5000), dtype="f8", compression="gzip", chunks=(1000, 1000), fillvalue=0.0
        )
    )


def bombs(tmp: Path) -> dict[str, tuple[str, bytes, str]]:
    return {
        "deflated DICOM, 16000x16000x16 bit": ("bomb.dcm", deflate_bomb(), "expands to more than"),
        "1200-frame DICOM": ("frames.dcm", frames_dicom(), "1200 frames"),
        ".mat with an external link": ("link.mat", mat_external_link(), "no cjdata.image"),
        ".mat with a virtual dataset": ("virtual.mat", mat_virtual_dataset(tmp), "not a 2-D image stored"),
        ".mat gzip bomb (200 MB of float64)": ("gz.mat", mat_compression_bomb(), "too large"),
    }


def test_each_bomb_is_refused_fast_with_little_memory(tmp_path):
    """In a fresh process per bomb: a clear UploadError within 2 s, peak memory +<= 300 MB."""
    for name, (fname, data, message) in bombs(tmp_path).items():
        assert len(data) < 10 * 1024 * 1024, name  # under the upload limit: the danger is what they expand to
        path = tmp_path / fname
        path.write_bytes(data)
        code = textwrap.dedent(f"""
            import resource, time
            from neurocbir.data.uploads import UploadError, read_scan
            data = open({str(path)!r}, "rb").read()
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            t = time.perf_counter()
            try:
                read_scan(data, {fname!r})
                print("ACCEPTED")
            except UploadError as exc:
                print("REFUSED", exc)
            grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
            print(f"{{time.perf_counter() - t:.3f}} {{grown:.0f}}")
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (name, out.stderr[-2000:])
        verdict, timing = out.stdout.strip().splitlines()
        seconds, grown_mb = map(float, timing.split())
        assert verdict.startswith("REFUSED") and message in verdict, (name, verdict)
        assert seconds < 2 and grown_mb <= 300, (name, seconds, grown_mb)


def test_bombs_get_4xx_from_the_api_and_uploads_are_one_file_of_bounded_size(small_run, small_cases, tmp_path):
    from fastapi.testclient import TestClient

    from neurocbir.app.api import create_app
    from neurocbir.serving.service import RetrievalService

    client = TestClient(create_app(RetrievalService.from_run(small_run, table=small_cases)))
    for name, (fname, data, message) in bombs(tmp_path).items():
        r = client.post("/query", files={"file": (fname, data, "application/octet-stream")})
        assert r.status_code in (400, 413) and message in r.json()["detail"], (name, r.text)
    jpg = small_cases.loader.image_path(int(small_cases.idx[0])).read_bytes()
    two = client.post("/query", files=[("file", ("a.jpg", jpg, "image/jpeg")), ("file", ("b.jpg", jpg, "image/jpeg"))])
    assert two.status_code == 400 and "files" in two.json()["detail"]

    def chunked():  # no Content-Length: the body is counted as it arrives
        for _ in range(22):
            yield b"\0" * (1024 * 1024)

    big = client.post("/query", content=chunked(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert big.status_code == 413
    assert client.post("/query", files={"file": ("ok.jpg", jpg, "image/jpeg")}).status_code == 200


def test_sixteen_bit_png_keeps_every_level():
    ramp = np.tile(np.linspace(0, 4000, 512).astype(np.uint16), (64, 1))
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    arr = read_scan(buf.getvalue(), "ramp.png")
    assert arr.max() == 4000 and len(np.unique(arr)) > 256 and np.array_equal(arr, ramp.astype(np.float32))


def test_monochrome1_dicom_is_inverted_like_its_monochrome2_twin(small_cases):
    img = small_cases.load_image(0).astype(np.uint16) * 10
    files = {}
    for photometric, pixels in (("MONOCHROME2", img), ("MONOCHROME1", img.max() + img.min() - img)):
        ds = _image_dataset(*img.shape, photometric=photometric)
        ds.PixelData = pixels.astype(np.uint16).tobytes()
        files[photometric] = read_scan(_dicom_bytes(ds), "x.dcm")
    assert np.array_equal(files["MONOCHROME1"], files["MONOCHROME2"])


def test_mri_files_shipped_with_pydicom_read(monkeypatch):
    """Real MR DICOMs in several transfer syntaxes (no download: only the files pydicom ships)."""
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    read = 0
    for path in sorted(folder.glob("MR_small*.dcm")):
        try:
            arr = read_scan(path.read_bytes(), path.name)
        except UploadError as exc:  # a codec this install lacks (JPEG-LS...) is refused clearly
            assert "cannot be decoded" in str(exc), (path.name, exc)
            continue
        assert arr.shape == (64, 64) and arr.std() > 0, path.name
        read += 1
    assert read >= 4


def test_the_page_never_puts_server_strings_into_html():
    static = Path(__file__).resolve().parents[1] / "src" / "neurocbir" / "app" / "static"
    script = (static / "app.js").read_text()
    assert "textContent" in script  # the page's script, where server strings are inserted, as text
    for page in (static / "index.html").read_text(), script:
        assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "outerHTML" not in page


@pytest.mark.parametrize("side", [512])
def test_a_small_deflated_dicom_still_reads(side):
    ds = _image_dataset(side, side)
    ds.PixelData = (np.arange(side * side, dtype=np.uint32) % 4096).astype(np.uint16).tobytes()
    arr = read_scan(_dicom_bytes(ds, DeflatedExplicitVRLittleEndian), "ok.dcm")
    assert arr.shape == (side, side) and arr.max() == 4095
