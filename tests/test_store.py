"""FAISS and Milvus (Lite, and a real server) give the same retrievals and the same NIR on a real index."""

from __future__ import annotations

import numpy as np
import pytest

from neurocbir.classify.neighbors import NIRClassifier, nir_positions
from neurocbir.retrieval.index import IndexMismatchError
from neurocbir.retrieval.milvus import MilvusStore, partition_name
from neurocbir.retrieval.store import FaissStore, deep_search, lookup
from tests.conftest import collection_name


@pytest.fixture(scope="module")
def real(small_run, small_cases):
    emb = np.load(small_run / "trial_0" / "embeddings.npz")
    ids = small_cases.idx[emb["archive_rows"]].astype(np.int64)
    return emb["archive"], ids, small_cases.label[emb["archive_rows"]], emb["test"]


def test_faiss_and_milvus_agree(real, tmp_path, milvus_uri):
    x, ids, labels, q = real
    f = FaissStore(tmp_path / "a.faiss", x.shape[1], checkpoint_sha256="ck")
    m = MilvusStore(milvus_uri, collection_name(), x.shape[1], checkpoint_sha256="ck")
    for s in (f, m):
        for b in range(0, len(x), 40):  # batches
            s.add(ids[b : b + 40], x[b : b + 40])
        assert s.count() == len(x)
    df, idf = f.search(q, 25)
    dm, idm = m.search(q, 25)
    assert (idf == idm).mean() > 0.99  # exact on both; ties can swap
    assert np.allclose(df, dm, atol=1e-4)
    label_of = lookup(ids, labels)
    for nth in (1, 10):
        ref = NIRClassifier(nth_incorrect=nth).fit(x, labels).incorrect_positions(q)
        for store in (f, m):  # the depth doubles from 4 until every class has its nth incorrect retrieval
            _, _, found = deep_search(store, label_of, q, 3, nth, start=4)
            assert (nir_positions(found, 3, nth) == ref).all()
    f.delete(ids[:10])
    m.delete(ids[:10])
    assert f.count() == m.count() == len(x) - 10
    assert not np.isin(f.search(q, 5)[1], ids[:10]).any() and not np.isin(m.search(q, 5)[1], ids[:10]).any()


@pytest.mark.parametrize("kind", ["flat", "milvus-server"])
def test_nir_deep_search_over_label_partitions_matches_the_doubling_search(
    real, small_cases, tmp_path, monkeypatch, kind, request
):
    """The partitioned store searches each label's partitions and merges them; where the first
    retrievals all share a label, it range-searches that label's partitions up to the nearest case
    of another; NIR's positions and the
    retrievals up to that case are the doubling search's, one slice per patient or not, with
    no-tumor cases (no type: skipped by NIR) nearest of all. On a
    Milvus server the partitions are the collection's, the range search the server's (FLAT: exact)."""
    import neurocbir.retrieval.store as store_module
    from neurocbir.retrieval.store import group_keys

    by_label = []  # what the search by label answered (None: it left it to the doubling search)
    original = store_module._by_label
    monkeypatch.setattr(store_module, "_by_label", lambda *a: by_label.append(r := original(*a)) or r)
    x, ids, labels, q = real
    label_of = lookup(ids, labels)  # typed cases only: a no-tumor case is no NIR retrieval (-1)
    # beside each query ten no-tumor cases (label 3, their own partitions), nearer than any typed case
    seed = 3
    print("seed", seed)
    near = np.repeat(q, 10, axis=0)
    near += 0.002 * np.random.default_rng(seed).standard_normal(near.shape).astype(np.float32)
    ids, x = np.concatenate([ids, ids.max() + 1 + np.arange(len(near))]), np.concatenate([x, near])
    labels = np.concatenate([labels, np.full(len(near), 3)])
    planes = np.array(["axial", "coronal", "sagittal"])[ids % 3]  # several partitions per label
    flat = FaissStore(tmp_path / "f.faiss", x.shape[1])
    if kind == "flat":
        parts = FaissStore(tmp_path / "p.faiss", x.shape[1])
    else:  # read with Session consistency: its own writes seen, no wait for a time tick per search (Strong)
        parts = MilvusStore(request.getfixturevalue("milvus_server").uri, collection_name(), x.shape[1])
        parts.add(ids, x, group_keys(labels, planes))
        parts.consistency = "Session"
    flat.add(ids, x)
    if kind == "flat":
        parts.add(ids, x, group_keys(labels, planes))
    ranged = []  # the range searches the search by label made (the run of one label)
    range_search = parts.range_search
    monkeypatch.setattr(parts, "range_search", lambda *a: ranged.append(r := range_search(*a)) or r)
    typed = ids[labels < 3]
    patient_of = lookup(typed, small_cases.patient_id[np.searchsorted(small_cases.idx, typed)].astype(str), missing="")
    long_runs = 0
    for group_of in (None, patient_of):
        for row in q:
            a = deep_search(flat, label_of, row[None], 3, 1, group_of, start=2)
            b = deep_search(parts, label_of, row[None], 3, 1, group_of, start=2)
            pa, pb = nir_positions(a[2], 3), nir_positions(b[2], 3)
            assert (pa == pb).all(), (pa, pb)
            n = int(pb.max()) + 1  # up to and including the first retrieval of another label
            assert (a[1][0][:n] == b[1][0][:n]).all()
            long_runs += int(pb.max() >= 2)
    assert long_runs >= 5, "too few queries needed more than the first search"
    assert sum(r is not None for r in by_label) >= 2 * len(q) - 5, "the search by label was hardly used"
    assert len(ranged) >= 5, "too few queries needed the range search"


def test_nir_read_to_a_depth_skips_the_no_tumor_cases_nearest_of_all(real, tmp_path, monkeypatch):
    """Read to a depth (the calibration's), NIR's doubling search counts the retrievals it can use:
    with more no-tumor cases (no type: skipped) beside each query than the depth, the search reads
    past them and returns the first typed retrievals of the whole list, NIR's positions the same
    (up to the depth). Over a store partitioned by label, each label's partitions are searched to
    that depth in one round (no range search), with the same answer."""
    import neurocbir.retrieval.store as store_module
    from neurocbir.retrieval.store import group_keys

    x, ids, labels, q = real
    seed = 5
    print("seed", seed)
    near = np.repeat(q, 40, axis=0)  # 40 no-tumor cases beside each query, nearer than any typed case
    near += 0.002 * np.random.default_rng(seed).standard_normal(near.shape).astype(np.float32)
    ids, x = np.concatenate([ids, ids.max() + 1 + np.arange(len(near))]), np.concatenate([x, near])
    label_of = lookup(ids[: len(labels)], labels)  # typed cases only: a no-tumor case gives -1
    labels = np.concatenate([labels, np.full(len(near), 3)])
    store, parts = FaissStore(tmp_path / "f.faiss", x.shape[1]), FaissStore(tmp_path / "p.faiss", x.shape[1])
    store.add(ids, x)
    parts.add(ids, x, group_keys(labels, np.array(["axial", "coronal"])[ids % 2]))
    ranged, by_label = [], []
    range_search, original = parts.range_search, store_module._by_label
    monkeypatch.setattr(parts, "range_search", lambda *a: ranged.append(a) or range_search(*a))
    monkeypatch.setattr(store_module, "_by_label", lambda *a: by_label.append(r := original(*a)) or r)
    for row in q:
        whole = deep_search(store, label_of, row[None], 3, 1, start=4, cap=len(x))
        for s in (store, parts):
            cut = deep_search(s, label_of, row[None], 3, 1, start=4, cap=16)
            n = int((cut[2] >= 0).sum())  # the doubling search may stop where NIR is decided, before 16
            m = min(n, int((whole[2] >= 0).sum()))
            assert 1 <= n <= 16 and (cut[1][0][:m] == whole[1][0][:m]).all()
            assert (nir_positions(cut[2], 3) == nir_positions(whole[2][:, :16], 3)).all()
    assert not ranged and sum(r is not None for r in by_label) == len(q)  # the search by label answered each


def test_hnsw_recall_and_persistence(real, tmp_path):
    x, ids, _, q = real
    exact = FaissStore(tmp_path / "e.faiss", x.shape[1])
    hnsw = FaissStore(tmp_path / "h.faiss", x.shape[1], kind="hnsw", checkpoint_sha256="ck")
    exact.add(ids, x)
    hnsw.add(ids, x)
    _, a = exact.search(q, 25)
    _, b = hnsw.search(q, 25)
    recall = np.mean([len(set(r1) & set(r2)) / 25 for r1, r2 in zip(a, b)])
    assert recall >= 0.99
    hnsw.save()
    back = FaissStore.open(tmp_path / "h.faiss", checkpoint_sha256="ck", dim=x.shape[1])
    assert back.kind == "hnsw" and back.count() == len(x) and (back.search(q, 25)[1] == b).all()
    back.delete(ids[:5])
    assert back.count() == len(x) - 5
    with pytest.raises(IndexMismatchError, match="checkpoint"):
        FaissStore.open(tmp_path / "h.faiss", checkpoint_sha256="other")
    with pytest.raises(IndexMismatchError, match="128-d"):
        FaissStore.open(tmp_path / "h.faiss", dim=64)


def test_milvus_refuses_another_dimension_or_encoder(milvus_uri):
    name = collection_name()
    MilvusStore(milvus_uri, name, 16, checkpoint_sha256="ck")
    with pytest.raises(IndexMismatchError, match=f"{name} holds 16-d"):
        MilvusStore(milvus_uri, name, 128)
    if milvus_uri.endswith(".db"):
        return  # Milvus Lite keeps no collection description: its file lives in (and is tied to) one archive
    with pytest.raises(IndexMismatchError, match=f"{name} was built with another encoder"):
        MilvusStore(milvus_uri, name, 16, checkpoint_sha256="other")


@pytest.mark.parametrize("index_type", ["HNSW", "IVF_FLAT"])
def test_the_server_builds_the_index_asked_for(real, milvus_server, index_type):
    """On a Milvus server the collection's index is the one asked for (Lite builds AUTOINDEX
    whatever is asked), and it answers as the exact search does."""
    x, ids, _, q = real
    store = MilvusStore(milvus_server.uri, collection_name(), x.shape[1], "ck", index_type=index_type)
    store.add(ids, x)
    store.save()
    index = store.client.describe_index(store.collection, "vector")
    assert index["index_type"] == index_type and index["metric_type"] == "L2"
    _, found = store.search(q, 10)
    assert (found == exact_ids(x, ids, q, 10)).mean() > 0.97


def test_filtered_search_inside_every_store(real, tmp_path, milvus_uri):
    """A filter (allowed ids) applied inside FAISS flat, FAISS HNSW and Milvus: only allowed
    cases come back, and they are the exact nearest allowed ones."""
    x, ids, labels, q = real
    allowed = ids[labels == 1]  # e.g. "gliomas only"
    ref = np.argsort(((q[:, None, :] - x[labels == 1][None]) ** 2).sum(-1), axis=1)[:, :5]
    stores = [
        FaissStore(tmp_path / "f.faiss", x.shape[1], checkpoint_sha256="ck"),
        FaissStore(tmp_path / "h.faiss", x.shape[1], kind="hnsw", checkpoint_sha256="ck"),
        MilvusStore(milvus_uri, collection_name(), x.shape[1], checkpoint_sha256="ck"),
    ]
    hnsw = stores[1]
    hnsw.add(ids, x)
    far = ids[labels == 2][:3]  # three cases of one type: HNSW's beam alone misses them for most queries
    d, found = hnsw.search(q, 3, allowed=far)
    assert (np.sort(found, axis=1) == np.sort(far)).all()  # the exact fallback finds them
    for s in stores:
        if s is not hnsw:
            s.add(ids, x)
        d, found = s.search(q, 5, allowed=allowed)
        assert np.isin(found, allowed).all()  # five allowed cases for every query, far ones too
        assert (found == allowed[ref]).mean() > 0.95  # exact (flat, Milvus FLAT) or nearly (HNSW)
        assert (np.diff(d, axis=1) >= -1e-6).all()
        _, few = s.search(q[:1], 5, allowed=allowed[:2])  # fewer allowed than asked: -1 pads
        assert set(few[0][few[0] >= 0]) <= set(allowed[:2].tolist())


@pytest.mark.parametrize(
    "kind", ["flat", "hnsw", "milvus", "milvus-unpartitioned", "milvus-server", "milvus-server-hnsw"]
)
def test_group_partitions_answer_type_and_plane_filters_exactly(real, small_cases, tmp_path, kind, request):
    """Stores partitioned by tumor type and plane (an archive's group_keys): a search limited to
    some groups returns the nearest cases of those groups only, however far they lie from the
    query, and saves and reopens whole; with no groups named, all partitions are searched. On
    Milvus each group is a partition of the collection (HNSW on the server included); a collection
    of an older neurocbir, its groups in a field only, is still filtered right."""
    from neurocbir.retrieval.store import group_keys
    from neurocbir.serving.sources import CaseFilter

    x, ids, labels, q = real
    rows = np.searchsorted(small_cases.idx, ids)
    groups = group_keys(labels, small_cases.plane[rows])
    if kind.startswith("milvus"):
        server = kind.startswith("milvus-server")
        uri = request.getfixturevalue("milvus_server").uri if server else str(tmp_path / "g.db")
        name, index = collection_name(), "HNSW" if kind.endswith("hnsw") else "FLAT"
        store = MilvusStore(uri, name, x.shape[1], checkpoint_sha256="ck", index_type=index)
        store.partitioned = kind != "milvus-unpartitioned"  # as the collections made before partitions
    else:
        store = FaissStore(tmp_path / "g.faiss", x.shape[1], kind=kind, checkpoint_sha256="ck")
    for b in range(0, len(x), 50):
        store.add(ids[b : b + 50], x[b : b + 50], groups[b : b + 50])
    if kind.startswith("milvus"):
        store.save()
        store = MilvusStore(uri, name, x.shape[1], checkpoint_sha256="ck", index_type=index)
        made = {partition_name(g) for g in set(groups)}
        assert store.partitioned == (kind != "milvus-unpartitioned")
        assert (made <= set(store.client.list_partitions(name))) == store.partitioned
    else:
        assert len(store.parts) == len(set(groups))
        store.save()
        store = FaissStore.open(tmp_path / "g.faiss", checkpoint_sha256="ck", dim=x.shape[1])
    for f in (CaseFilter(tumor_type="pituitary"), CaseFilter(plane="coronal", tumor_type="meningioma")):
        keep = np.isin(groups, f.groups())
        assert keep.any() and not keep.all()
        ref = ids[keep][np.argsort(((q[:, None, :] - x[keep][None]) ** 2).sum(-1), axis=1)[:, :5]]
        d, found = store.search(q, 5, groups=f.groups())
        assert np.isin(found, ids[keep]).all()
        assert (found == ref).mean() > 0.97  # exact within the partitions (HNSW: nearly)
        assert (np.diff(d, axis=1) >= -1e-6).all()
        sized = CaseFilter(tumor_type="glioma", min_area_mm2=800.0)  # a size range still goes by ids
        allowed = ids[sized.size_mask(small_cases.area_mm2[rows])]
        _, found = store.search(q, 5, allowed=allowed, groups=sized.groups())
        ok = np.isin(found, allowed) & np.isin(found, ids[np.isin(groups, sized.groups())])
        assert ok[found >= 0].all()
    everything = store.search(q, 10)[1]
    assert (everything == exact_ids(x, ids, q, 10)).mean() > 0.97


def exact_ids(x, ids, q, k):  # the reference answer, by brute force
    return ids[np.argsort(((q[:, None, :] - x[None]) ** 2).sum(-1), axis=1)[:, :k]]


def test_a_size_range_far_from_the_query_is_found_by_searching_deeper(tmp_path):
    """A size filter over-fetches in the type's partitions; when the cases in range are all far
    from the query (none among the first over-fetch), it searches deeper and still returns the
    exact nearest cases in range, in distance order."""
    from neurocbir.retrieval.store import group_keys
    from neurocbir.serving.sources import CaseFilter, SearchedCases

    rng = np.random.default_rng(0)
    n, dim = 4000, 16
    x = rng.normal(size=(n, dim)).astype(np.float32)
    q = np.zeros((1, dim), np.float32)
    far = np.argsort(-np.linalg.norm(x, axis=1))[:80]  # the 2 % of cases farthest from the query
    areas = np.full(n, 100.0)
    areas[far] = 900.0
    ids = np.arange(n, dtype=np.int64)
    store = FaissStore(tmp_path / "s.faiss", dim, checkpoint_sha256="ck")
    store.add(ids, x, group_keys(np.zeros(n, int), np.full(n, "axial")))

    class Cases(SearchedCases):
        partitioned = True

        def __init__(self):
            self.store, self.store_ids, self.attr_area = store, ids, areas

    sized = CaseFilter(tumor_type="meningioma", min_area_mm2=500.0)
    dist, found = Cases()._partitioned_search(q, sized, 5)
    want = far[np.argsort(np.linalg.norm(x[far], axis=1))[:5]]
    assert found[0][:5].tolist() == want.tolist()
    assert (np.diff(dist[0][:5]) >= 0).all()


def test_a_flat_range_search_returns_the_nearest_first_as_a_full_sort_would(tmp_path):
    """A range search that meets more cases than its limit keeps the limit nearest, in order, ties
    in the partitions' order: the same as sorting every hit (it no longer sorts them all)."""
    seed = 7
    print("seed", seed)
    rng = np.random.default_rng(seed)
    n, dim = 3000, 8
    x = rng.integers(0, 3, (n, dim)).astype(np.float32)  # a coarse grid: many equal distances
    store = FaissStore(tmp_path / "s", dim, "flat", "sha")
    store.add(np.arange(n), x, [f"{i % 3}:axial" for i in range(n)])
    groups = ["0:axial", "1:axial"]
    q = x[0]
    d, ids = store.range_search(q, 2.5, groups, limit=None)
    assert len(ids) > 200 and (np.diff(d) >= 0).all()
    ties = (np.diff(d) == 0).sum()
    assert ties > 100  # the case that needs care
    for limit in (1, 50, 199, len(ids), len(ids) + 5):
        d_lim, ids_lim = store.range_search(q, 2.5, groups, limit=limit)
        assert np.array_equal(ids_lim, ids[:limit]) and np.array_equal(d_lim, d[:limit])
