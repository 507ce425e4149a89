"""End to end on a small patient-wise subset of the real data: cache, train, index, evaluate."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from neurocbir.cli import app
from neurocbir.data.transforms import preprocess
from neurocbir.models.inference import load_model
from neurocbir.models.runs import TrainConfig
from neurocbir.retrieval.index import VectorIndex
from neurocbir.training.cached import train_run

runner = CliRunner()


@pytest.fixture(scope="module")
def supcon_run(tmp_path_factory, small_data_dir, feature_cache):
    out = tmp_path_factory.mktemp("run") / "supcon"
    res = runner.invoke(
        app,
        [
            "train",
            "--recipe",
            "cached",
            "--loss",
            "supcon",
            "--trials",
            "2",
            "--epochs",
            "8",
            "--n-copies",
            "1",
            "--out",
            str(out),
            "--data",
            str(small_data_dir),
            "--cache-dir",
            str(feature_cache),
        ],
    )
    assert res.exit_code == 0, res.output
    return out


def test_train_writes_a_complete_run(supcon_run, small_cases):
    cfg = json.loads((supcon_run / "config.json").read_text())
    assert cfg["loss"] == "supcon" and cfg["fold"] == 5 and cfg["trials"] == 2
    for seed in (0, 1):
        t = supcon_run / f"trial_{seed}"
        assert {"checkpoint.pt", "embeddings.npz", "index.faiss", "index.faiss.json", "log.jsonl"} <= {
            p.name for p in t.iterdir()
        }
        emb = np.load(t / "embeddings.npz")
        assert emb["archive"].shape == (int((small_cases.fold != 5).sum()), 128)
        assert emb["test"].shape == (int((small_cases.fold == 5).sum()), 128)
        assert not set(small_cases.patient_id[emb["archive_rows"]]) & set(small_cases.patient_id[emb["test_rows"]])
        sha = hashlib.sha256((t / "checkpoint.pt").read_bytes()).hexdigest()
        index = VectorIndex.load(t / "index.faiss", checkpoint_sha256=sha, dim=128)
        assert len(index) == len(emb["archive"])
        losses = [json.loads(line)["loss"] for line in (t / "log.jsonl").read_text().splitlines()]
        assert len(losses) == 8 and losses[-1] < losses[0]  # it learns


def test_evaluate_json_contract(supcon_run, tmp_path):
    out = tmp_path / "m.json"
    res = runner.invoke(app, ["evaluate", str(supcon_run), "--json", str(out)])
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    assert set(m["classifiers"]) == {"knn5", "knn7", "knn25", "nir", "inir"}
    for v in m["classifiers"].values():
        assert {"kappa_mean", "kappa_ensemble", "auroc_mean", "auroc_ensemble"} <= set(v)
        assert v["kappa_mean"] > 0 and v["auroc_mean"] > 0.6  # every classifier above chance
    # pretrained features + a trained head separate the tumor types far above chance
    assert m["classifiers"]["knn7"]["auroc_ensemble"] > 0.7
    assert 0 <= m["structure"]["anatomical_consistency_top5"] <= 1
    assert set(m["structure"]["tsd_mm2_at_k"]) == {"1", "5", "10", "25"}
    assert (supcon_run / "latent_space.png").stat().st_size > 10_000
    # calibration on the test fold: ECE before / after per classifier, prediction-set coverage
    cal = m["calibration"]
    assert set(cal["classifiers"]) == {"nir", "inir", "knn7"}
    assert all(0 <= c["ece_after_mean"] <= 1 and c["temperature"] > 0 for c in cal["classifiers"].values())
    sets = cal["nir_prediction_sets"]
    assert 1 <= sets["0.9"]["mean_set_size"] <= sets["0.99"]["mean_set_size"] <= 3
    assert sets["0.9"]["coverage"] <= sets["0.99"]["coverage"]
    assert (supcon_run / "reliability.png").stat().st_size > 10_000
    assert "ECE before" in (supcon_run / "metrics.md").read_text()
    assert "| supcon | 5 | 2 |" in (supcon_run / "metrics.md").read_text()
    # the inner-CV scores (tops retrained per inner fold) stand beside the test scores, and the
    # KNN-overfit K is picked there, never on the test fold
    inner, overfit = m["inner_cv"], m["knn_overfit"]
    assert inner["kappa"]["nir"] > 0 and inner["n"] == int((small_cases_of(supcon_run).fold != 5).sum())
    assert overfit["k_inner_cv_retrained"] == inner["knn_best_k"] in overfit["ks"]
    best = max(inner["knn_kappa_by_k"].values())
    assert inner["knn_kappa_by_k"][str(inner["knn_best_k"])] == best
    assert overfit["kappa_k_inner_cv_retrained"] == overfit["kappa_mean_by_k"][overfit["ks"].index(inner["knn_best_k"])]
    assert "NIR kappa: inner CV / test" in (supcon_run / "metrics.md").read_text()
    # retrieval as the papers report it: mAP and P@k, the ensemble's at the top level
    r = m["retrieval"]
    assert (
        r["map"] == r["ensemble"]["slices"]["map"]
        and r["precision_at_10"] == r["ensemble"]["slices"]["precision_at_10"]
    )
    for kind in ("slices", "one_per_patient"):
        for scores in (r["ensemble"][kind], r["trials_mean"][kind]):
            assert set(scores) == {"map", "precision_at_1", "precision_at_5", "precision_at_10"}
            assert all(0 <= v <= 1 for v in scores.values())
    assert r["ensemble"]["slices"]["precision_at_10"] > 1 / 3 + 0.1  # above chance for three types
    assert "one slice per patient" in (supcon_run / "metrics.md").read_text()


def small_cases_of(run):
    from neurocbir.data.cases import load_cases

    return load_cases(json.loads((run / "config.json").read_text())["data"])


def test_checkpoint_rebuilds_the_full_encoder(supcon_run, small_cases):
    """A new image through frozen bottom + trained top gives the stored embedding."""
    m = load_model(supcon_run, 0)
    encoder, top = m.encoder, m.top
    emb = np.load(supcon_run / "trial_0" / "embeddings.npz")
    row = int(emb["test_rows"][0])
    x = preprocess(small_cases.load_image(row))[None]
    with torch.no_grad():
        e = top(encoder.forward_stages(x, 0, top.cut)).numpy()[0]
    # the cache is float16, so allow a little rounding
    assert np.dot(e, emb["test"][0]) > 0.999


def test_training_is_deterministic(small_cases, feature_cache, tmp_path):
    cfg = TrainConfig(loss="ce", trials=1, epochs=2, n_copies=1, cache_dir=str(feature_cache))
    train_run(cfg, tmp_path / "a", table=small_cases, progress=False)
    train_run(cfg, tmp_path / "b", table=small_cases, progress=False)
    a, b = (np.load(tmp_path / r / "trial_0" / "embeddings.npz") for r in "ab")
    assert np.array_equal(a["test"], b["test"]) and "test_mlp_proba" in a
    assert np.array_equal(a["test_mlp_proba"], b["test_mlp_proba"])


@pytest.mark.parametrize("loss", ["triplet", "nca", "infonce"])
def test_every_loss_trains(loss, small_cases, feature_cache, tmp_path):
    cfg = TrainConfig(loss=loss, trials=1, epochs=2, n_copies=1, cache_dir=str(feature_cache))
    train_run(cfg, tmp_path, table=small_cases, progress=False)
    emb = np.load(tmp_path / "trial_0" / "embeddings.npz")
    assert np.isfinite(emb["test"]).all()
    assert np.allclose(np.linalg.norm(emb["test"], axis=1), 1, atol=1e-4)


def test_cli_errors_are_clear(tmp_path, small_data_dir):
    res = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert res.exit_code == 2 and "not a run directory" in res.output
    res = runner.invoke(
        app, ["train", "--loss", "arcface", "--out", str(tmp_path / "r"), "--data", str(small_data_dir)]
    )
    assert res.exit_code == 2 and "loss must be one of" in res.output
    res = runner.invoke(
        app, ["train", "--loss", "triplet", "--out", str(tmp_path / "r"), "--data", str(small_data_dir)]
    )
    assert res.exit_code == 2 and "--recipe cached" in res.output  # the default (lesion) recipe is SupCon's
    res = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), "--data", str(tmp_path / "none")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["info", "--data", str(small_data_dir)])
    assert res.exit_code == 0 and "fold 5" in res.output


def test_full_fine_tuning_path_runs(small_cases, feature_cache, tmp_path):
    """trainable_blocks=-1 trains the whole CNN from the cached preprocessed images (GPU path)."""
    tiny = small_cases.subset(
        np.concatenate([np.flatnonzero(small_cases.fold != 5)[::8], np.flatnonzero(small_cases.fold == 5)[::8]])
    )
    cfg = TrainConfig(
        loss="supcon", trials=1, epochs=1, n_copies=1, trainable_blocks=-1, batch_size=12, cache_dir=str(feature_cache)
    )
    train_run(cfg, tmp_path, table=tiny, progress=False)
    m = load_model(tmp_path, 0)
    encoder, top = m.encoder, m.top
    assert top.cut == 0 and len(top.stages) == encoder.n_blocks + 2
    assert np.isfinite(np.load(tmp_path / "trial_0" / "embeddings.npz")["test"]).all()


def test_search_uses_patient_grouped_inner_cv_and_feeds_train(small_data_dir, feature_cache, tmp_path):
    res = runner.invoke(
        app,
        [
            "search",
            "--loss",
            "triplet",
            "--out",
            str(tmp_path),
            "--data",
            str(small_data_dir),
            "--cache-dir",
            str(feature_cache),
            "--grid",
            '{"margin": [0.05, 0.2], "epochs": [1]}',
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "search.json").read_text())
    assert len(doc["results"]) == 2 and all(len(r["nir_kappa_folds"]) == 3 for r in doc["results"])
    assert doc["best"] in [r["params"] for r in doc["results"]]
    res = runner.invoke(
        app,
        [
            "train",
            "--recipe",
            "cached",
            "--loss",
            "triplet",
            "--trials",
            "1",
            "--params",
            str(tmp_path / "search.json"),
            "--out",
            str(tmp_path / "run"),
            "--data",
            str(small_data_dir),
            "--cache-dir",
            str(feature_cache),
        ],
    )
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["margin"] == doc["best"]["margin"] and cfg["epochs"] == 1
    bad = runner.invoke(
        app, ["search", "--out", str(tmp_path), "--data", str(small_data_dir), "--grid", '{"nope": [1]}']
    )
    assert bad.exit_code == 2 and "unknown hyper-parameters" in bad.output


def test_trials_are_independent_of_the_trials_before_them(small_cases, feature_cache, tmp_path):
    """With trained blocks, trial k used to start from the blocks trial k-1 trained: a seed's
    trial must be the same trained alone (--first-seed) or after other seeds."""
    cfg = dict(loss="supcon", epochs=1, n_copies=1, trainable_blocks=2, cache_dir=str(feature_cache))
    train_run(TrainConfig(trials=2, **cfg), tmp_path / "both", table=small_cases, progress=False)
    train_run(TrainConfig(trials=1, first_seed=1, **cfg), tmp_path / "alone", table=small_cases, progress=False)
    assert not (tmp_path / "alone" / "trial_0").exists()
    after, alone = (
        torch.load(tmp_path / r / "trial_1" / "checkpoint.pt", weights_only=True)["state"] for r in ("both", "alone")
    )
    assert after.keys() == alone.keys() and any(k.startswith("stages.") for k in after)
    assert all(torch.equal(after[k], alone[k]) for k in after)
    # different seeds do give different trials, so the equality above is not vacuous
    first = torch.load(tmp_path / "both" / "trial_0" / "checkpoint.pt", weights_only=True)["state"]
    assert not all(torch.equal(first[k], after[k]) for k in first if k.startswith("stages."))
