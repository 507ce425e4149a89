import numpy as np
import pytest

from neurocbir.retrieval.index import IndexMismatchError, VectorIndex


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


def test_without_faiss_the_numpy_search_gives_faiss_answers(tmp_path, monkeypatch):
    """Where FAISS is missing (a borrowed GPU machine trains and evaluates there), the index is
    exact in NumPy: the same ids and distances as FAISS's flat index, the same filter, and a saved
    file that loads back, there and here."""
    import neurocbir.retrieval.index as index_module

    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 32)).astype(np.float32)
    q = rng.normal(size=(9, 32)).astype(np.float32)
    allowed = rng.choice(300, 40, replace=False)
    with_faiss = VectorIndex.build(x, "abc")
    refs = [with_faiss.search(q, 10), with_faiss.search(q, 10, allowed=allowed)]
    monkeypatch.setattr(index_module, "faiss", None)
    without = VectorIndex.build(x, "abc")
    assert isinstance(without.index, index_module.ExactL2)
    for (d_ref, ids_ref), kw in zip(refs, ({}, {"allowed": allowed})):
        d, ids = without.search(q, 10, **kw)
        assert (ids == ids_ref).all() and d == pytest.approx(d_ref, rel=1e-4, abs=1e-4)
    assert (without.search(q, 50, allowed=allowed[:5])[1][:, 5:] == -1).all()  # fewer allowed than k: padded
    without.save(tmp_path / "i.faiss")
    assert (
        VectorIndex.load(tmp_path / "i.faiss", checkpoint_sha256="abc", dim=32).search(q, 10)[1] == refs[0][1]
    ).all()
    monkeypatch.undo()  # FAISS is back: the NumPy file still loads
    assert (VectorIndex.load(tmp_path / "i.faiss").search(q, 10)[1] == refs[0][1]).all()
