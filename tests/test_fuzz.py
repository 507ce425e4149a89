"""Random bytes and mutated real files at every input reader: a clear error or a valid
result, never another exception, never a hang."""

from __future__ import annotations

import contextlib
import io

import h5py
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neurocbir.data.uploads import UploadError, read_scan
from neurocbir.reports.text import ReportParseError, parse_report

FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def _ok_or_clear(data: bytes, name: str) -> None:
    try:
        arr = read_scan(data, name)
    except UploadError as exc:
        assert str(exc)
        return
    assert arr.ndim == 2 and arr.dtype == np.float32 and np.isfinite(arr).all()


def _real_files(cases) -> dict[str, bytes]:
    jpeg = (cases.loader.root / "images" / f"{int(cases.idx[0])}.jpg").read_bytes()
    png = (cases.loader.root / "masks" / f"{int(cases.idx[0])}.png").read_bytes()
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.create_group("cjdata")["image"] = np.arange(64 * 64, dtype=np.int16).reshape(64, 64)
    return {"scan.jpg": jpeg, "mask.png": png, "scan.mat": buf.getvalue()}


@FUZZ
@given(data=st.binary(max_size=4096), name=st.sampled_from(["x.png", "x.jpg", "x.dcm", "x.mat", "x"]))
def test_random_bytes(data, name):
    _ok_or_clear(data, name)


def test_mutated_real_files(cases):
    rng = np.random.default_rng(0)
    for name, data in _real_files(cases).items():
        for _ in range(60):
            b = bytearray(data)
            kind = rng.integers(3)
            if kind == 0:  # flip bytes
                for pos in rng.integers(0, len(b), rng.integers(1, 20)):
                    b[pos] = rng.integers(256)
            elif kind == 1:  # truncate
                b = b[: rng.integers(1, len(b))]
            else:  # splice a block of random bytes in
                pos = rng.integers(0, len(b))
                b[pos:pos] = rng.integers(0, 256, rng.integers(1, 500)).astype(np.uint8).tobytes()
            _ok_or_clear(bytes(b), name)


@FUZZ
@given(st.text(max_size=400))
def test_report_parser_on_random_text(text):
    try:
        a = parse_report(text)
    except ReportParseError as exc:
        assert "cannot read report" in str(exc) or "empty" in str(exc)
        return
    assert a.tumor_type in ("meningioma", "glioma", "pituitary") and a.area_mm2 >= 0


def test_report_parser_on_mutated_reports(cases):
    from neurocbir.reports.text import case_attributes, make_report

    rng = np.random.default_rng(1)
    for i in range(0, 300, 3):
        text = list(make_report(case_attributes(cases, i), "alternative", i))
        for pos in rng.integers(0, len(text), 5):
            text[pos] = chr(rng.integers(32, 127))
        with contextlib.suppress(ReportParseError):
            parse_report("".join(text))


@FUZZ
@given(text=st.one_of(st.binary(max_size=600), st.text(max_size=600).map(str.encode)))
def test_cases_csv_reader_on_random_input(tmp_path_factory, text):
    """`neurocbir add`'s cases.csv reader: a clear ArchiveError or valid cases."""
    from neurocbir.retrieval.archive import ArchiveError
    from neurocbir.retrieval.casefiles import scan_folder

    folder = tmp_path_factory.mktemp("csv")
    (folder / "a.jpg").write_bytes(b"x")
    (folder / "cases.csv").write_bytes(text)
    _scan_ok_or_clear(folder, scan_folder, ArchiveError)


def _scan_ok_or_clear(folder, scan_folder, error) -> None:
    try:
        files = scan_folder(folder)
    except error as exc:
        assert str(exc)
        return
    import csv
    import io

    from neurocbir.retrieval.casefiles import parse_label

    named = set()  # the labels the file's rows name (any that parse)
    for row in csv.reader(io.StringIO((folder / "cases.csv").read_bytes().decode("utf-8", "replace"))):
        for cell in row:
            with contextlib.suppress(Exception):
                named.add(parse_label(cell, ""))
    for f in files:
        assert f.path.is_file() and f.path.is_relative_to(folder.resolve())
        assert f.label in named  # a label a row names, never one made up


def test_cases_csv_reader_on_mutated_files(tmp_path):
    from neurocbir.retrieval.archive import ArchiveError
    from neurocbir.retrieval.casefiles import scan_folder

    (tmp_path / "a.jpg").write_bytes(b"x")
    good = b'file,label,patient_id,plane,area_mm2,report\na.jpg,glioma,P1,axial,812.5,"T1 contrast MRI ..."\n'
    rng = np.random.default_rng(0)
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.integers(1, 6)):
            pos = int(rng.integers(len(data)))
            op = rng.integers(3)
            if op == 0:
                data[pos] = int(rng.integers(256))
            elif op == 1:
                del data[pos]
            else:
                data.insert(pos, int(rng.choice([0, 44, 34, 10, 13, 255])))
        (tmp_path / "cases.csv").write_bytes(bytes(data))
        _scan_ok_or_clear(tmp_path, scan_folder, ArchiveError)
