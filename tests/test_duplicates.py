"""Duplicates (issue 38): an archive recognises an image it already holds (re-encoded, resized,
cropped a little or mirrored; how often, over every fold-5 slice, is measured in
benchmarks/duplicates.py), `neurocbir add` reports and skips it, and a query whose image is in the
archive says so and does not count that case as evidence."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from neurocbir.retrieval.duplicates import DuplicateIndex, ImagePrints


def _jpeg(image: np.ndarray, quality: int = 70) -> np.ndarray:
    u8 = np.uint8(np.clip(image / max(float(image.max()), 1e-6) * 255, 0, 255))
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("L"), dtype=np.float32)


def _copies(image: np.ndarray) -> dict[str, tuple[np.ndarray, bool]]:
    h, w = image.shape
    small = np.asarray(Image.fromarray(image).resize((w * 2 // 3, h * 2 // 3), Image.Resampling.BILINEAR))
    return {
        "re-encoded": (_jpeg(image), False),
        "resized": (small, False),
        "mirrored": (image[:, ::-1].copy(), True),
        "mirrored and re-encoded": (_jpeg(image[:, ::-1].copy(), 90), True),
        "cropped 3 % each side": (
            image[round(0.03 * h) : h - round(0.03 * h), round(0.03 * w) : w - round(0.03 * w)],
            False,
        ),
        "cropped 5 % off the left and top": (image[round(0.05 * h) :, round(0.05 * w) :], False),
        "mirrored and cropped": (image[round(0.02 * h) : h - round(0.02 * h), ::-1][:, round(0.02 * w) :].copy(), True),
    }


@pytest.fixture(scope="module")
def one_per_patient(cases):
    """One slice of each of 60 patients (seeded, printed), as they are stored."""
    seed = 38
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    patients = rng.choice(np.unique(cases.patient_id), 60, replace=False)
    return [int(rng.choice(np.flatnonzero(cases.patient_id == p))) for p in patients]


def test_copies_are_found_as_their_original_and_other_patients_are_not(cases, one_per_patient):
    images = [cases.load_image(r) for r in one_per_patient]
    prints = [ImagePrints(im) for im in images]
    coarse, fine = np.stack([p.coarse[0] for p in prints]), np.stack([p.fine for p in prints])
    index = DuplicateIndex().add(range(len(images)), coarse, fine)
    for i, image in enumerate(images[:20]):
        for name, (copy, mirrored) in _copies(image).items():
            found = index.find(copy)
            assert found, f"slice {one_per_patient[i]}: its {name} copy was not found"
            assert (found[0].case_id, found[0].mirrored) == (i, mirrored), (name, found)
    for i in range(len(images)):  # every other patient's slice, both orientations: none is taken for i
        rest = [j for j in range(len(images)) if j != i]
        others = DuplicateIndex().add(rest, coarse[rest], fine[rest])
        assert others.find(prints[i]) == [], f"slice {one_per_patient[i]} taken for another patient's"


def test_a_large_archive_s_inverted_file_finds_the_copies_and_added_cases_join_a_copy_only(
    cases, one_per_patient, monkeypatch
):
    """From IVF_FROM cases the coarse prints are searched through an inverted file (its sizes made
    small here): the copies are found as exhaustively; cases added to a copy (while others search
    the original) are found by the copy, not by the original, and the large part is shared."""
    from neurocbir.retrieval import duplicates

    monkeypatch.setattr(duplicates, "IVF_FROM", 50)
    monkeypatch.setattr(duplicates, "IVF_LISTS", 4)
    monkeypatch.setattr(duplicates, "IVF_PROBE", 2)
    images = [cases.load_image(r) for r in one_per_patient]
    prints = [ImagePrints(im) for im in images]
    coarse, fine = np.stack([p.coarse[0] for p in prints]), np.stack([p.fine for p in prints])
    index = DuplicateIndex(lambda ids: fine[ids], expected=50).add(range(50), coarse[:50])  # fine ones read
    assert index.parts[0].index.nlist == 4  # an inverted file
    for i, image in enumerate(images[:4]):
        for name, (copy, mirrored) in _copies(image).items():
            found = index.find(copy)
            assert found and (found[0].case_id, found[0].mirrored) == (i, mirrored), (name, found)
    late = list(range(50, len(images)))
    grown = index.with_added(late, coarse[late])
    assert grown.parts[0] is index.parts[0] and len(grown) == len(images) and len(index) == 50
    for i in late:
        assert [d.case_id for d in grown.find(images[i])] == [i]
        assert index.find(images[i]) == []
    again = grown.with_added([len(images)], coarse[:1])  # a second addition copies the small part only
    assert again.parts[0] is index.parts[0] and len(again.parts[1].ids) == len(late) + 1
    assert len(grown.parts[1].ids) == len(late)


def _add(folder, archive, run, *extra):
    cmd = [sys.executable, "-m", "neurocbir.cli", "add", str(folder), "--archive", str(archive), "--run", str(run)]
    r = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return r


def _folder(path, rows):
    path.mkdir()
    with open(path / "cases.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", "patient_id"])
        for name, image, label, pid in rows:
            Image.fromarray(np.uint8(np.clip(image / max(float(image.max()), 1e-6) * 255, 0, 255))).save(path / name)
            w.writerow([name, label, pid])
    return path


def test_add_reports_duplicates_and_a_query_of_an_archived_image_says_so(small_cases, small_run, tmp_path):
    from neurocbir.classify.neighbors import nir_positions
    from neurocbir.data.cases import CLASS_NAMES
    from neurocbir.serving.service import RetrievalService

    rows = np.arange(len(small_cases))[: len(small_cases) * 2 // 3 : 4]
    images = {int(r): small_cases.load_image(int(r)) for r in rows}
    first = [
        (f"s{r}.png", im, CLASS_NAMES[small_cases.label[r]], small_cases.patient_id[r]) for r, im in images.items()
    ]
    archive = tmp_path / "archive"
    _add(_folder(tmp_path / "first", first), archive, small_run)
    r0, r1 = (int(r) for r in rows[:2])
    stored_patients = set(small_cases.patient_id[rows].tolist())
    fresh_row = next(i for i in range(len(small_cases)) if small_cases.patient_id[i] not in stored_patients)
    label0 = CLASS_NAMES[small_cases.label[r0]]
    second = [
        ("flipped.png", images[r0][:, ::-1].copy(), label0, "someone"),  # a display copy
        ("again.png", _jpeg(images[r1], 60), CLASS_NAMES[small_cases.label[r1]], "x"),  # re-exported
        ("new.png", small_cases.load_image(fresh_row), "glioma", "new"),  # another patient's slice
    ]
    folder = _folder(tmp_path / "second", second)
    out = _add(folder, archive, small_run, "--json")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    by_file = {d["file"]: d for d in summary["duplicates"]}
    from neurocbir.retrieval.archive import CaseArchive

    arch = CaseArchive.open(archive, writer=False)
    stored = {row[1]: row[0] for row in arch.db.execute("SELECT id, image_path FROM cases")}
    arch.close()
    id0, id1 = stored[str(tmp_path / "first" / f"s{r0}.png")], stored[str(tmp_path / "first" / f"s{r1}.png")]
    assert by_file.keys() == {"flipped.png", "again.png"} and summary["added"] == 1
    assert (by_file["flipped.png"]["case_id"], by_file["flipped.png"]["mirrored"]) == (id0, True)
    assert (by_file["again.png"]["case_id"], by_file["again.png"]["mirrored"]) == (id1, False)

    service = RetrievalService.from_archive(small_run, archive)
    answer = service.query(np.asarray(Image.open(folder / "flipped.png"), dtype=np.float32), k=10)
    assert answer["already_in_archive"]["case_id"] == id0 and answer["already_in_archive"]["mirrored"] is True
    marked = [r["case_id"] for r in answer["retrievals"] if r["same_image_as_query"]]
    assert marked in ([], [id0]) and all(
        r["case_id"] != id0 for r in answer["retrievals"] if not r["same_image_as_query"]
    )
    q, _, _ = service.analyse(np.asarray(Image.open(folder / "flipped.png"), dtype=np.float32))
    dist, ids, labels = service.cases.neighbours(q, False)
    others = labels[ids != id0]
    expected = nir_positions(others[None], len(CLASS_NAMES))[0][service.cases.classes]
    assert [answer["nir_positions"][CLASS_NAMES[c]] for c in service.cases.classes] == expected.tolist()
    unseen = next(
        i
        for i in range(len(small_cases))
        if small_cases.patient_id[i] not in stored_patients | {small_cases.patient_id[fresh_row]}
    )
    fresh = service.query(small_cases.load_image(unseen))  # a patient the archive never received
    assert fresh["already_in_archive"] is None and not any(r["same_image_as_query"] for r in fresh["retrievals"])

    out = _add(folder, archive, small_run, "--keep-duplicates", "--json")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["added"] == 2 and {d["file"] for d in summary["duplicates"]} == {"flipped.png", "again.png"}


def test_a_copy_met_in_the_same_add_names_its_original_and_adding_again_decides_the_same(small_run, tmp_path):
    """Figshare holds near-identical neighbouring slices of one patient: 1479 is taken for 1478's
    copy, and 1536 lies within the float16 rounding of the archive's prints from the threshold to
    1535. Sent in one `neurocbir add`, a copy is reported with its original's case id (not a
    temporary one, though both were in the same batch), and adding the folder again, as a resumed
    add does, adds nothing: a run compares new files with the prints the archive will keep."""
    from neurocbir.data.cases import default_data_dir
    from neurocbir.retrieval.archive import CaseArchive

    data = default_data_dir()
    with open(data / "metadata.csv", newline="") as fh:
        meta = {r["image_file"]: r for r in csv.DictReader(fh)}
    folder = tmp_path / "slices"
    folder.mkdir()
    names = ["1478.jpg", "1479.jpg", "1535.jpg", "1536.jpg"]
    with open(folder / "cases.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", "patient_id"])
        for name in names:
            (folder / name).write_bytes((data / "images" / name).read_bytes())  # the released files, unchanged
            w.writerow([name, meta[f"images/{name}"]["label_name"], meta[f"images/{name}"]["pid"]])
    archive = tmp_path / "archive"
    first = json.loads(_add(folder, archive, small_run, "--json").stdout.strip().splitlines()[-1])
    arch = CaseArchive.open(archive, writer=False)
    stored = {row[1]: row[0] for row in arch.db.execute("SELECT id, image_path FROM cases")}
    arch.close()
    reported = {d["file"]: d["case_id"] for d in first["duplicates"]}
    assert reported.get("1479.jpg") == stored[str(folder / "1478.jpg")], first["duplicates"]
    assert all(case_id in stored.values() for case_id in reported.values()), first["duplicates"]
    assert first["added"] + len(reported) == len(names)
    again = json.loads(_add(folder, archive, small_run, "--json").stdout.strip().splitlines()[-1])
    assert again["added"] == 0, again
    assert {d["file"]: d["case_id"] for d in again["duplicates"]} == reported


def test_registration_ranks_agree_with_scipy():
    """Stage 3 ranks windows and subsets of a stored print by its own code (speed): ties share their
    mean rank, as scipy's rankdata gives them, on data with many ties (a stored print's background)."""
    from scipy.stats import rankdata

    from neurocbir.retrieval.duplicates import _rank, _SubsetRanks

    seed = 42
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    for _ in range(50):
        values = rng.integers(0, 12, 400).astype(np.float32)
        keep = rng.random(400) < rng.uniform(0.3, 1.0)
        np.testing.assert_allclose(_rank(values), rankdata(values))
        np.testing.assert_allclose(_SubsetRanks(values).of(keep), rankdata(values[keep]))


def test_print_ranks_agree_with_scipy():
    """The prints rank many windows at once by their own code (speed): each row's ranks, ties sharing
    their mean rank, as scipy's rankdata gives them, on windows with a flat background (many ties)."""
    from scipy.stats import rankdata

    from neurocbir.retrieval.duplicates import _ranks

    seed = 43
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    windows = rng.random((81, 32, 32)).astype(np.float32)
    windows[:, :8] = 0.25  # the padded background: one long tie per window
    windows[::3, :, :4] = rng.integers(0, 3, (27, 32, 4))  # short ties, other values in other rows
    r = rankdata(windows.reshape(81, -1), axis=1)
    r -= r.mean(1, keepdims=True)
    expected = r / np.linalg.norm(r, axis=1, keepdims=True)
    np.testing.assert_allclose(_ranks(windows), expected, atol=1e-6)


def test_print_windows_equal_pil_box_resampling_of_each(cases, one_per_patient):
    """A query's 2 x 81 fine windows come from one matrix product per axis (speed); archives store
    prints that PIL's BOX resampling made window by window, so both must give the same pixels (to
    float32 rounding) on real slices, both orientations, at every variant's window."""
    from neurocbir.retrieval import duplicates as dup

    boxes = [(ox - sx, oy - sy, ox + sx, oy + sy) for ox, oy, sx, sy in dup.VARIANTS] + [(-1, -1, 1, 1)]
    unranked = dup._ranks
    for i in one_per_patient[:8]:
        prints = ImagePrints(cases.load_image(i))
        for view in (0, 1):
            patch = prints._fine_patches[view]
            e = max(dup.SCALES) + 2 * max(abs(v) for v in dup.SHIFTS)
            c, r = patch.width / 2, patch.width / (2 * e)
            by_pil = np.stack(
                [
                    np.asarray(
                        patch.resize(
                            (dup.FINE, dup.FINE),
                            Image.Resampling.BOX,
                            box=(c + x0 * r, c + y0 * r, c + x1 * r, c + y1 * r),
                        )
                    )
                    for x0, y0, x1, y1 in boxes
                ]
            )
            try:
                dup._ranks = lambda windows: windows.reshape(len(windows), -1)  # the pixels, before ranking
                by_product = prints._fine_windows(view, boxes)
            finally:
                dup._ranks = unranked
            np.testing.assert_allclose(by_product, by_pil.reshape(len(boxes), -1), rtol=1e-6, atol=1e-5)
            assert np.array_equal(prints._fine_windows(view, boxes), unranked(by_pil))  # the same ranks
