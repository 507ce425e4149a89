from __future__ import annotations

import h5py
import numpy as np
import pytest

from neurocbir.data.cases import CLASS_NAMES, DatasetError, FigshareSource, grouped_inner_folds, load_cases


def test_bundled_dataset_matches_its_readme(cases):
    assert len(cases) == 3064
    assert len(set(cases.patient_id.tolist())) == 233
    counts = {CLASS_NAMES[c]: int((cases.label == c).sum()) for c in range(3)}
    assert counts == {"meningioma": 708, "glioma": 1426, "pituitary": 930}
    pats_per_fold = [len(set(cases.patient_id[cases.fold == f].tolist())) for f in range(1, 6)]
    assert pats_per_fold == [45, 46, 48, 47, 47]
    # slice 1 is an axial meningioma of 4564 px = 1095.8 mm^2
    i = int(np.flatnonzero(cases.idx == 1)[0])
    assert cases.plane[i] == "axial" and cases.label[i] == 0
    assert cases.area_mm2[i] == pytest.approx(1095.8, abs=0.05)


@pytest.mark.parametrize("fold", [1, 2, 3, 4, 5])
def test_splits_are_patient_wise(cases, fold):
    train, test = cases.split(fold)
    assert len(train) + len(test) == len(cases)
    assert not set(train.patient_id.tolist()) & set(test.patient_id.tolist())


def test_default_test_fold_has_47_patients(cases):
    _, test = cases.split()
    assert len(set(test.patient_id.tolist())) == 47


def test_inner_cv_is_patient_grouped(cases):
    train, _ = cases.split(5)
    folds = grouped_inner_folds(train, 3)
    assert len(folds) == 3
    for tr, va in folds:
        assert not set(train.patient_id[tr].tolist()) & set(train.patient_id[va].tolist())
        assert set(train.label[va].tolist()) == {0, 1, 2}


def test_images_and_masks_load(cases):
    img = cases.load_image(0)
    mask = cases.load_mask(0)
    assert img.shape == (512, 512) and img.dtype == np.float32
    assert mask.dtype == bool and mask.sum() == 4564


def test_figshare_mat_reader(figshare_dir):
    t = load_cases(figshare_dir)
    assert t.idx.tolist() == [1, 2, 3, 4]
    assert t.label.tolist() == [0, 1, 2, 0]
    assert t.patient_id.tolist() == ["100360", "100360", "MR0402", "MR0999"]
    assert t.fold.tolist() == [1, 1, 2, 3]
    # 256x256 originals are measured on the 512 grid: 200 px -> 800 px
    assert t.area_mm2.tolist() == pytest.approx([200 * 0.2401, 200 * 0.2401, 800 * 0.2401, 200 * 0.2401])
    img = t.load_image(0)
    assert img.shape == (512, 512) and (img[:, :256] == 0).all() and img[:, 256:].max() > 0
    assert t.load_mask(0)[10:20, 30:50].all()
    assert (t.plane == "").all()  # the release has no planes


def test_figshare_malformed_files_give_clear_errors(figshare_dir):
    (figshare_dir / "2.mat").write_bytes(b"MATLAB 5.0 MAT-file, not HDF5")
    with pytest.raises(DatasetError, match="2.mat: not a MATLAB v7.3"):
        load_cases(figshare_dir)
    with h5py.File(figshare_dir / "2.mat", "w") as f:
        f.create_group("cjdata")["label"] = np.array([[1.0]])
    with pytest.raises(DatasetError, match="lacks fields"):
        load_cases(figshare_dir)
    (figshare_dir / "2.mat").unlink()
    with pytest.raises(DatasetError, match="missing figshare file"):
        FigshareSource(figshare_dir).table()


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_cases(tmp_path / "nope")
    with pytest.raises(DatasetError, match="neither metadata.csv"):
        load_cases(tmp_path)
