"""Retrieval mAP and precision at k, checked against rankings worked out by hand, and against
scikit-learn's average precision on random data."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from neurocbir.evaluate.retrieval import per_patient, retrieval_report, retrieval_scores, squared_distances


def test_scores_of_a_ranking_worked_out_by_hand():
    # one query of class 0; archive ranked by distance: 0, 1, 0, 1, 1 -> relevant at ranks 1 and 3
    d2 = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    out = retrieval_scores(d2, np.array([0, 1, 0, 1, 1]), np.array([0]))
    assert out["map"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert out["precision_at_1"] == 1.0 and out["precision_at_5"] == pytest.approx(2 / 5)


def test_map_equals_scikit_learns_average_precision():
    rng = np.random.default_rng(0)
    q, a = rng.normal(size=(20, 8)), rng.normal(size=(60, 8))
    yq, ya = rng.integers(0, 3, 20), rng.integers(0, 3, 60)
    d2 = squared_distances(q, a)
    assert np.allclose(d2, ((q[:, None] - a[None]) ** 2).sum(-1), atol=1e-4)
    want = np.mean([average_precision_score(ya == yq[i], -d2[i]) for i in range(20)])
    assert retrieval_scores(d2, ya, yq)["map"] == pytest.approx(want, abs=1e-6)


def test_one_slice_per_patient_ranks_patients_by_their_closest_slice():
    # patients A (class 0: slices at 0.1 and 0.9), B (class 1: 0.2), C (class 0: 0.5)
    d2 = np.array([[0.1, 0.9, 0.2, 0.5]])
    labels, groups = np.array([0, 0, 1, 0]), np.array(["A", "A", "B", "C"])
    dist, patient_labels = per_patient(d2, labels, groups)
    assert dist.tolist() == [[pytest.approx(0.1), pytest.approx(0.2), pytest.approx(0.5)]]
    assert patient_labels.tolist() == [0, 1, 0]
    report = retrieval_report(d2, labels, np.array([0]), groups)
    assert report["one_per_patient"]["map"] == pytest.approx((1 + 2 / 3) / 2)  # A, B, C: relevant at 1 and 3
    assert report["slices"]["map"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)  # A, B, C, A


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        retrieval_scores(np.zeros((2, 3)), np.zeros(4), np.zeros(2))
