"""NIR / I-NIR / KNN on hand-made neighbour lists and toy archives with known answers."""

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from neurocbir.classify.neighbors import KNNClassifier, NIRClassifier, nir_positions


def test_nir_positions_by_hand():
    # distance-sorted neighbour labels of one query: A A B A C B ...
    labels = np.array([[0, 0, 1, 0, 2, 1, 1, 0, 2, 2, 1, 1]])
    # class 0: first non-0 at position 2; class 1: position 0; class 2: position 0
    assert nir_positions(labels, 3, 1).tolist() == [[2, 0, 0]]
    # 2nd incorrect: class 0 -> position 4 (B at 2, C at 4); class 1 -> 1; class 2 -> 1
    assert nir_positions(labels, 3, 2).tolist() == [[4, 1, 1]]
    # 5th incorrect for class 1: non-1 positions are 0,1,3,4,7,... -> 7
    assert nir_positions(labels, 3, 5)[0, 1] == 7


def test_nir_positions_when_too_few_incorrect():
    labels = np.array([[0, 0, 0, -1]])  # 3 valid retrievals, all class 0, then padding
    # no incorrect retrieval for class 0: the list is continued with incorrect ones
    assert nir_positions(labels, 2, 1).tolist() == [[3, 0]]
    assert nir_positions(labels, 2, 10).tolist() == [[12, 9]]


def _line_archive():
    # 1-D archive on a line: distances from a query at 0 order the cases by |x|.
    x = np.array([[0.1], [0.2], [-0.3], [0.4], [0.5], [-0.6], [0.7]], dtype=np.float32)
    y = np.array(["glioma", "glioma", "meningioma", "glioma", "pituitary", "pituitary", "meningioma"])
    return x, y


def test_nir_classifier_known_answer():
    x, y = _line_archive()
    clf = NIRClassifier().fit(x, y)
    assert clf.classes_.tolist() == ["glioma", "meningioma", "pituitary"]
    q = np.zeros((1, 1), np.float32)
    # order: glioma, glioma, meningioma, glioma, pituitary, pituitary, meningioma
    assert clf.incorrect_positions(q).tolist() == [[2, 0, 0]]
    proba = clf.predict_proba(q)
    assert proba == pytest.approx(softmax([2.0, 0.0, 0.0])[None])
    assert clf.predict(q).tolist() == ["glioma"]


def test_inir_can_disagree_with_nir():
    # nearest is one pituitary, then many gliomas: NIR says pituitary, I-NIR glioma
    x = np.arange(1, 16, dtype=np.float32)[:, None]
    y = np.array([2] + [1] * 14)
    q = np.zeros((1, 1), np.float32)
    assert NIRClassifier(nth_incorrect=1).fit(x, y).predict(q).tolist() == [2]
    inir = NIRClassifier(nth_incorrect=10).fit(x, y)
    # class 1: non-1 retrievals: only position 0, then the list continues -> 15 + 9 - 1 = 23
    # class 2: non-2 at positions 1..14 -> 10th at position 10
    assert inir.incorrect_positions(q).tolist() == [[23, 10]]
    assert inir.predict(q).tolist() == [1]


def test_one_class_archive():
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    clf = NIRClassifier().fit(x, np.full(5, 1))
    p = clf.predict_proba(x[:2])
    assert p.shape == (2, 1) and np.allclose(p, 1.0)
    assert clf.predict(x[:2]).tolist() == [1, 1]


def test_knn_votes():
    x, y = _line_archive()
    q = np.zeros((1, 1), np.float32)
    assert KNNClassifier(n_neighbors=3).fit(x, y).predict_proba(q) == pytest.approx(np.array([[2 / 3, 1 / 3, 0]]))
    assert KNNClassifier(n_neighbors=5).fit(x, y).predict(q).tolist() == ["glioma"]
    # K larger than the archive uses the whole archive
    assert KNNClassifier(n_neighbors=50).fit(x, y).predict_proba(q).sum() == pytest.approx(1.0)


def test_patient_filters():
    x, y = _line_archive()
    groups = np.array(["p1", "p1", "p2", "p3", "p4", "p5", "p6"])
    q = np.zeros((1, 1), np.float32)
    # excluding the query's own patient p1 removes the two nearest gliomas
    clf = NIRClassifier(exclude_same_patient=True).fit(x, y, groups=groups)
    assert clf.predict(q, groups=["p1"]).tolist() == ["meningioma"]
    # one slice per patient: second p1 slice dropped -> glioma, meningioma, glioma, ...
    clf = NIRClassifier(one_per_patient=True).fit(x, y, groups=groups)
    assert clf.incorrect_positions(q).tolist() == [[1, 0, 0]]
    _, ids = clf.kneighbors(q)
    assert ids[0].tolist() == [0, 2, 3, 4, 5, 6, -1]
    with pytest.raises(ValueError, match="patient ids"):
        NIRClassifier(exclude_same_patient=True).fit(x, y)
    with pytest.raises(ValueError, match="queries' patient ids"):
        NIRClassifier(exclude_same_patient=True).fit(x, y, groups=groups).predict(q)


def test_sklearn_conventions():
    x, y = _line_archive()
    clf = NIRClassifier(nth_incorrect=10)
    assert clone(clf).get_params()["nth_incorrect"] == 10
    with pytest.raises(NotFittedError):
        clf.predict(x)
    with pytest.raises(ValueError):
        clf.fit(x, y[:3])
    with pytest.raises(ValueError):
        clf.fit(np.full_like(x, np.nan), y)
    clf.fit(x, y)
    with pytest.raises(ValueError, match="features"):
        clf.predict(np.zeros((1, 2), np.float32))
    assert clf.score(x, y) == pytest.approx(np.mean(clf.predict(x) == y))


def test_nir_matches_brute_force_on_random_data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    y = rng.integers(0, 3, 200)
    q = rng.normal(size=(20, 8)).astype(np.float32)
    for nth in (1, 10):
        got = NIRClassifier(nth_incorrect=nth).fit(x, y).incorrect_positions(q)
        for i in range(len(q)):
            order = y[np.argsort(((x - q[i]) ** 2).sum(1), kind="stable")]
            for c in range(3):
                assert got[i, c] == np.flatnonzero(order != c)[nth - 1]
