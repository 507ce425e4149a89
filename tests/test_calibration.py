"""Calibrated probabilities and conformal prediction sets: the statistics, and the run's own
calibration (fitted by inner CV on training patients) through the service and the API."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import softmax

from neurocbir.classify.calibration import Calibrator, expected_calibration_error, fit_temperature


def _draw(n: int, temperature: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """I_c-like logits (integers 0..40) whose true class probabilities are softmax(z / T)."""
    rng = np.random.default_rng(seed)
    z = rng.integers(0, 40, (n, 3)).astype(float) * rng.random((n, 1))
    p = softmax(z / temperature, axis=1)
    y = np.array([rng.choice(3, p=row) for row in p])
    return z, y, rng.integers(0, n // 8, n)  # ~8 slices per "patient"


def test_temperature_recovers_the_scale_and_fixes_ece():
    z, y, _ = _draw(6000, 4.0, 0)
    t = fit_temperature(z, y)
    assert 3.5 < t < 4.6
    raw, fixed = softmax(z, axis=1), softmax(z / t, axis=1)
    assert expected_calibration_error(raw, y) > 0.1 > 0.03 > expected_calibration_error(fixed, y)
    assert (raw.argmax(1) == fixed.argmax(1)).all()  # the ranking (kappa, AUROC) is unchanged


def test_conformal_sets_cover_new_patients_at_the_stated_rate():
    z, y, groups = _draw(4000, 4.0, 1)
    cal = Calibrator.fit(z, y, groups)
    zt, yt, _ = _draw(4000, 4.0, 2)
    p = cal.proba(zt)
    sizes = {}
    for coverage in (0.8, 0.9, 0.95):
        sets = cal.prediction_set(p, coverage)
        assert sets[np.arange(len(yt)), yt].mean() >= coverage - 0.02
        assert sets[np.arange(len(yt)), p.argmax(1)].all()  # the prediction is always in its set
        sizes[coverage] = sets.sum(1).mean()
    assert 1 <= sizes[0.8] <= sizes[0.9] <= sizes[0.95] < 3
    with pytest.raises(ValueError, match="coverage"):
        cal.threshold(1.0)


def _mostly_sure(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits like a good retrieval model's: nine answers in ten sure (all neighbours of one type),
    one in ten torn between types; the true class drawn from softmax(z)."""
    rng = np.random.default_rng(seed)
    z = rng.random((n, 3)) * 1.5
    sure = rng.random(n) < 0.9
    z[sure, rng.integers(0, 3, sure.sum())] += 6.0
    p = softmax(z, axis=1)
    y = np.array([rng.choice(3, p=row) for row in p])
    return z, y, rng.integers(0, n // 8, n)


def test_a_set_of_one_type_is_never_shown_beside_a_low_confidence():
    """The set grows where the calibrated confidence is low, so that low-confidence answers are
    covered at about the stated rate too; the conformal threshold alone (forced non-empty) covers
    them far less often, and showed one type beside a confidence under 50 %."""
    seed = 3
    print("seed", seed)
    cal = Calibrator.fit(*_mostly_sure(4000, seed))
    z, y, _ = _mostly_sure(4000, seed + 1)
    p = cal.proba(z)
    rows, low = np.arange(len(y)), p.max(1) < 0.7
    assert low.sum() > 200
    conformal = 1 - p <= cal.threshold(0.95)
    conformal[rows, p.argmax(1)] = True
    sets = cal.prediction_set(p, 0.95)
    assert (sets >= conformal).all()  # never narrower than the conformal set
    assert ((p * sets).sum(1) >= 0.95 - 1e-9).all()  # a set holds at least 95 % of its answer's probability
    assert (p[sets.sum(1) == 1].max(1) >= 0.95).all()  # one type only with a confidence of at least 95 %
    assert (p[conformal.sum(1) == 1].max(1) < 0.5).any()  # which the conformal set alone did not keep
    covered, before = sets[rows, y], conformal[rows, y]
    print(
        "coverage, all / confidence < 0.7:", covered.mean(), covered[low].mean(), "conformal alone:", before[low].mean()
    )
    assert covered.mean() >= 0.95 and covered[low].mean() >= 0.93
    assert before[low].mean() < 0.8
    assert Calibrator.from_dict(cal.as_dict()).threshold(0.9) == pytest.approx(cal.threshold(0.9), abs=1e-6)


def test_a_run_is_calibrated_on_training_patients_only(small_run):
    doc = json.loads((small_run / "calibration.json").read_text())
    assert set(doc["classifiers"]) == {"nir", "inir", "knn7"}
    nir = doc["classifiers"]["nir"]
    # softmax(I_c) is overconfident on held-out patients; the calibrated probabilities are less so
    assert nir["temperature"] > 0 and nir["inner_cv_ece_after"] < nir["inner_cv_ece_before"]
    assert len(nir["scores"]) > 20 and nir["scores"] == sorted(nir["scores"])


def test_query_returns_calibrated_confidence_and_a_prediction_set(small_run, small_cases):
    from fastapi.testclient import TestClient

    from neurocbir.app.api import create_app
    from neurocbir.serving.service import RetrievalService

    svc = RetrievalService.from_run(small_run, table=small_cases)
    client = TestClient(create_app(svc))
    rows = svc.cases.example_rows[:8]
    for row in rows:
        jpg = small_cases.loader.image_path(int(small_cases.idx[row])).read_bytes()
        sets = {}
        for coverage in (0.5, 0.99):
            r = client.post(f"/query?coverage={coverage}", files={"file": ("q.jpg", jpg, "image/jpeg")})
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["calibrated"] and out["coverage"] == coverage
            assert out["prediction"] in out["prediction_set"]
            assert sum(out["probabilities"].values()) == pytest.approx(1, abs=1e-3)
            assert out["confidence"] == max(out["probabilities"].values())
            sets[coverage] = set(out["prediction_set"])
        assert sets[0.5] <= sets[0.99]
        assert out["neighbours_disagree"] == (
            len(out["prediction_set"]) > 1 or max(out["knn_vote"], key=out["knn_vote"].get) != out["prediction"]
        )
    # calibration spreads the probabilities: fewer answers at > 99% than softmax(I_c) gives
    raw = [
        max(softmax(np.array(list(svc.query(small_cases.load_image(int(r)))["nir_positions"].values()), float)))
        for r in rows
    ]
    cal = [svc.query(small_cases.load_image(int(r)))["confidence"] for r in rows]
    assert np.mean(cal) < np.mean(raw)
    assert client.post("/query?coverage=1.5", files={"file": ("q.jpg", jpg, "image/jpeg")}).status_code == 422


def test_calibrate_refits_an_existing_run_reproducibly(small_run, small_data_dir, feature_cache, tmp_path):
    """`neurocbir calibrate RUN` (runs trained before calibration existed) gives back the same
    calibration that training wrote: same inner folds, same seed."""
    import shutil

    from typer.testing import CliRunner

    from neurocbir.cli import app

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    (run / "calibration.json").unlink()
    res = CliRunner().invoke(
        app, ["calibrate", str(run), "--data", str(small_data_dir)], env={"NEUROCBIR_CACHE": str(feature_cache)}
    )
    assert res.exit_code == 0, res.output
    again, first = (json.loads((r / "calibration.json").read_text())["classifiers"] for r in (run, small_run))
    for name in first:
        assert again[name]["temperature"] == pytest.approx(first[name]["temperature"], rel=1e-3)
    bad = CliRunner().invoke(app, ["calibrate", str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and "not a run directory" in bad.output


def test_the_api_shows_the_probabilities_that_were_evaluated(small_run, small_cases):
    """The served confidence is the calibrated probability the evaluation measured (same
    logits, same temperature), not a second formula."""
    from neurocbir.classify.calibration import load, neighbour_logits
    from neurocbir.classify.neighbors import NIRClassifier
    from neurocbir.data.cases import CLASS_NAMES
    from neurocbir.serving.service import RetrievalService

    svc = RetrievalService.from_run(small_run, table=small_cases)
    emb = np.load(small_run / "trial_0" / "embeddings.npz")
    nir = NIRClassifier().fit(emb["archive"], small_cases.label[emb["archive_rows"]])
    cal = load(small_run)["nir"]
    for row in svc.cases.example_rows[:5]:
        q, _, _ = svc.analyse(small_cases.load_image(int(row)))
        expected = cal.proba(neighbour_logits("nir", nir.neighbour_labels(q), 3))[0]
        shown = svc.query(small_cases.load_image(int(row)))["probabilities"]
        assert [shown[c] for c in CLASS_NAMES] == pytest.approx(expected, abs=1e-4)


def _neighbour_lists(sizes: tuple[int, ...], n: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour labels of ``n`` queries over an archive with ``sizes`` cases per type, each query
    inside a type's cluster (every case of that type comes first: what the served model's
    embedding shows, docs/results.md scale-confidence), 4 % of them of another type than the
    cluster's. (labels, true types, patients)."""
    labels, y = np.empty((n, sum(sizes)), int), np.empty(n, int)
    for i in range(n):
        c = int(rng.integers(3))
        labels[i] = [c] * sizes[c] + [k for k in range(3) if k != c for _ in range(sizes[k])]
        y[i] = c if rng.random() < 0.96 else (c + 1) % 3
    return labels, y, rng.integers(0, n // 8, n)


def test_nir_confidence_read_to_its_depth_holds_when_the_archive_grows(test_seed, tmp_path):
    """Calibrated on a small archive, NIR's confidence at full depth rises with the archive's size
    for the same evidence; read to ``nir_depth`` (which every type of the calibration archive
    fills) it stays what it was, calibrated, in an archive ten times larger."""
    from neurocbir.classify.calibration import fit_calibrators, load, neighbour_logits, nir_depth, save

    rng = np.random.default_rng(test_seed)
    small, grown = (60, 90, 120), (600, 900, 1200)
    labels, y, groups = _neighbour_lists(small, 2000, rng)
    depth = nir_depth(np.repeat(np.arange(3), small), 3)
    assert depth == 32  # the largest power of two not above the smallest type (60)
    full = Calibrator.fit(neighbour_logits("nir", labels, 3), y, groups)
    cut = Calibrator.fit(neighbour_logits("nir", labels, 3, depth), y, groups, depth=depth)
    again, y_again, _ = _neighbour_lists(small, 2000, rng)
    test, y_test, _ = _neighbour_lists(grown, 2000, rng)
    conf = {
        (name, size): cal.proba(neighbour_logits("nir", lists, 3, cal.depth)).max(1).mean()
        for name, cal in (("full", full), ("cut", cut))
        for size, lists in (("small", again), ("grown", test))
    }
    assert conf["full", "grown"] - conf["full", "small"] > 0.02, conf  # the same evidence, more confident
    assert abs(conf["cut", "grown"] - conf["cut", "small"]) < 0.002, conf
    ece = {
        n: expected_calibration_error(c.proba(neighbour_logits("nir", test, 3, c.depth)), y_test)
        for n, c in (("full", full), ("cut", cut))
    }
    assert ece["cut"] < 0.02 < ece["full"], ece
    # the depth is kept with the calibration, and only NIR's lists are cut
    save(tmp_path, fit_calibrators(labels, y, groups, 3, depth), how="test")
    loaded = load(tmp_path)
    assert loaded["nir"].depth == depth and loaded["inir"].depth is None and loaded["knn7"].depth is None
