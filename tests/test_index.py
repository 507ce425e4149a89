import numpy as np
import pytest

from neurocbir.index import IndexMismatchError, VectorIndex


def test_exact_search_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 128)).astype(np.float32)
    q = rng.normal(size=(7, 128)).astype(np.float32)
    d, ids = VectorIndex.build(x).search(q, 25)
    ref = np.sqrt(((q[:, None] - x[None]) ** 2).sum(-1))
    assert (ids == np.argsort(ref, axis=1)[:, :25]).all()
    assert d == pytest.approx(np.sort(ref, axis=1)[:, :25], rel=1e-4)


def test_save_load_and_refusals(tmp_path):
    x = np.random.default_rng(1).normal(size=(50, 16)).astype(np.float32)
    idx = VectorIndex.build(x, checkpoint_sha256="abc123")
    idx.save(tmp_path / "i.faiss")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.faiss", "i.faiss.json"]  # no temp files left
    back = VectorIndex.load(tmp_path / "i.faiss", checkpoint_sha256="abc123", dim=16)
    assert len(back) == 50 and (back.search(x[:3], 1)[1][:, 0] == [0, 1, 2]).all()
    with pytest.raises(IndexMismatchError, match="checkpoint"):
        VectorIndex.load(tmp_path / "i.faiss", checkpoint_sha256="other")
    with pytest.raises(IndexMismatchError, match="128-d"):
        VectorIndex.load(tmp_path / "i.faiss", dim=128)
    with pytest.raises(FileNotFoundError):
        VectorIndex.load(tmp_path / "missing.faiss")


def test_bad_vectors():
    idx = VectorIndex.build(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="dimension"):
        idx.search(np.zeros((1, 5), np.float32), 1)
    with pytest.raises(ValueError, match="NaN"):
        VectorIndex.build(np.full((2, 4), np.nan))
