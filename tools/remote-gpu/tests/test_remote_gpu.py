"""The tooling suite (run by `make test` after the product's): tools/remote-gpu/, the scripts that run the lesion recipe on a borrowed GPU machine, run here
on the CPU on a few dozen slices at 64 px (the same code paths, minutes instead of hours)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neurocbir.data.cases import load_cases

ROOT = Path(__file__).resolve().parents[3]
TOOLS = ROOT / "tools" / "remote-gpu"


def test_gpu_recipe_script_runs_on_cpu(tmp_path, data_dir):
    """tools/remote-gpu/recipe.sh as a GPU machine runs it, on 45 slices at 64 px, and without FAISS
    (the bundle leaves its 19 MB wheel out, to fit the 64 MiB transfer): trials, inner-CV
    calibration, evaluation and the served checkpoint all land in OUT."""
    out = tmp_path / "out"
    no_faiss = tmp_path / "no-faiss"
    no_faiss.mkdir()
    (no_faiss / "faiss.py").write_text("raise ModuleNotFoundError('FAISS is not installed on the GPU machine')\n")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_BUNDLE": str(tmp_path / "no-bundle")}
    env["PYTHONPATH"] = str(no_faiss)
    args = ["--data", str(data_dir), "--per-group", "3", "--epochs", "1", "--trials", "2", "--folds", "5,1"]
    args += ["--batch-size", "16", "--image-size", "64", "--runs", str(tmp_path / "runs")]
    proc = subprocess.run(
        ["bash", str(TOOLS / "recipe.sh"), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 45 and set(summary["folds"]) == {"5", "1"}
    for fold in ("5", "1"):
        res = summary["folds"][fold]
        assert len(res["timings"]["trials_s"]) == 2 and res["metrics"]["trials"] == 2
        nir = res["metrics"]["classifiers"]["nir"]
        # one epoch on 45 slices at 64 px learns little: what is checked is that every figure was computed
        assert all(np.isfinite(nir[k]) for k in ("kappa_ensemble", "auroc_ensemble"))
        assert np.isfinite(res["timings"]["tumor_outline"]["median_dice"])
    assert "calibration_s" in summary["folds"]["5"]["timings"]  # the first fold is calibrated
    # the served checkpoint: float16, loadable as a run without any pretrained weights
    run = tmp_path / "served"
    (run / "trial_0").mkdir(parents=True)
    shutil.copy(out / "checkpoint.pt", run / "trial_0" / "checkpoint.pt")
    shutil.copy(out / "config.json", run / "config.json")
    blob = torch.load(run / "trial_0" / "checkpoint.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in blob["state"].values() if v.is_floating_point())
    from neurocbir.models.inference import load_model

    model = load_model(run, 0)
    cases = load_cases(data_dir)
    emb, desc, prob = model.analyse(cases.load_image(0))
    assert emb.shape == (1, 128) and desc.shape == (1, 1280) and prob.shape == (64, 64)
    assert (out / "calibration.json").is_file() and (out / "log.txt").is_file()
    # the study temperature, fitted on the inner folds' held-out patients (each one study)
    studies = json.loads((out / "study_calibration.json").read_text())
    assert studies["temperature"] > 0
    assert 2 <= studies["training_patients"]["n_patients"] <= 45  # the smoke run's training patients
    # the outline level of the served model, chosen on the inner folds' held-out patients
    from neurocbir.training.lesion_run import TUMOR_LEVELS

    level = json.loads((out / "tumor_level.json").read_text())
    assert level["level"] in TUMOR_LEVELS
    errors = level["held_out_median_area_error"]
    assert len(errors) == len(TUMOR_LEVELS) and errors[str(level["level"])] == min(errors.values())
    # `--recalibrate RUN` refits both for a run that holds no patients out (as `neurocbir calibrate`
    # does), from its files alone: the same inner CV again, on the same slices, the same result
    again = tmp_path / "again"
    proc = subprocess.run(
        ["bash", str(TOOLS / "recipe.sh"), *args, "--recalibrate", str(tmp_path / "runs" / "lesion-fold5")],
        env={**env, "OUT": str(again)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((again / "tumor_level.json").read_text()) == level
    for name in ("calibration.json", "study_calibration.json"):
        assert json.loads((again / name).read_text()) == json.loads((out / name).read_text())
    assert not (again / "summary.json").exists()  # nothing trained beyond the inner folds


def test_gpu_parallel_runs_jobs_at_once_and_packs_their_small_files(tmp_path, data_dir):
    """tools/remote-gpu/parallel.sh: each argument is one recipe.py job, all run at once; what
    comes back from the device is one results.tgz with each job's summary, logs and trial
    evaluations, and no checkpoint or embeddings (the device returns few, small files)."""
    import tarfile

    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "WORK": str(work), "PYTHON": sys.executable}
    env["GPU_BUNDLE"] = str(tmp_path / "no-bundle")
    tiny = f"--data {data_dir} --per-group 3 --epochs 1 --batch-size 16 --image-size 64 --no-serve --trials 1"
    proc = subprocess.run(
        ["bash", str(TOOLS / "parallel.sh"), f"{tiny} --folds 1", f"{tiny} --folds 2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [p.name for p in out.iterdir()] == ["results.tgz"]
    with tarfile.open(out / "results.tgz") as tar:
        names = tar.getnames()
        summaries = {n: json.load(tar.extractfile(n)) for n in names if n.endswith("summary.json")}
    assert not [n for n in names if n.endswith((".pt", ".npy", "embeddings.npz", ".faiss"))]
    # each trial's test-fold evaluation comes back (a fold can be ensembled across leases)
    assert sorted(n for n in names if n.endswith(".npz")) == [
        f"./job{n}/runs/lesion-fold{n}/trial_0/evaluation.npz" for n in (1, 2)
    ]
    assert sorted(summaries) == ["./job1/summary.json", "./job2/summary.json"]
    assert [list(summaries[f"./job{n}/summary.json"]["folds"]) for n in (1, 2)] == [["1"], ["2"]]
    assert "./job1/options.txt" in names and "./job2/log.txt" in names


def test_trials_of_two_leases_ensemble_as_if_trained_in_one(tmp_path, data_dir, monkeypatch):
    """A fold's trials trained in two GPU leases (``--first-seed``), merged from their small
    evaluation.npz files alone by tools/remote-gpu/merge_runs.py, score exactly as the same trials
    evaluated together from their embeddings; a seed given twice is refused."""
    sys.path.insert(0, str(TOOLS))
    import merge_runs
    import recipe

    from neurocbir.data.cases import load_cases
    from neurocbir.evaluate.run import evaluate_run

    env = {**os.environ, "PYTHON": sys.executable, "GPU_BUNDLE": str(tmp_path / "no-bundle")}
    tiny = ["--data", str(data_dir), "--per-group", "4", "--epochs", "1", "--batch-size", "16", "--image-size", "64"]
    tiny += ["--no-serve", "--folds", "1"]
    leases = {"a": ["--trials", "2"], "b": ["--trials", "1", "--first-seed", "2"]}
    for name, extra in leases.items():
        proc = subprocess.run(
            ["bash", str(TOOLS / "recipe.sh"), *tiny, *extra],
            env={**env, "OUT": str(tmp_path / name)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # what comes back from a lease: no checkpoints, no embeddings
    back = {}
    for name in leases:
        back[name] = tmp_path / "back" / name
        shutil.copytree(tmp_path / name, back[name], ignore=shutil.ignore_patterns("*.pt", "embeddings.npz", "index*"))
    merged = merge_runs.merge(1, [back["a"], back["b"]], tmp_path / "merged")
    got = merged["folds"]["1"]["metrics"]
    # the same three trials, evaluated together from their embeddings
    together = tmp_path / "together"
    shutil.copytree(tmp_path / "a" / "runs" / "lesion-fold1", together)
    shutil.copytree(tmp_path / "b" / "runs" / "lesion-fold1" / "trial_2", together / "trial_2")
    for ev in together.glob("trial_*/evaluation.npz"):
        ev.unlink()  # scored again from the embeddings
    want = evaluate_run(together, recipe.small_subset(load_cases(data_dir), 4), plots=False)
    assert got["trials"] == want["trials"] == 3
    assert got["classifiers"] == want["classifiers"] and got["knn_overfit"] == want["knn_overfit"]
    assert got["structure"] == want["structure"] and got["retrieval"] == want["retrieval"]
    assert [m["seeds"] for m in merged["merged_from"]] == [[0, 1], [2]]
    assert merged["folds"]["1"]["timings"]["tumor_outline"]["seed"] == 0
    with pytest.raises(ValueError, match="seed 0 of fold 1 is in both"):
        merge_runs.merge(1, [back["a"], back["a"]], tmp_path / "twice")
    # scoring that fails part-way leaves no half-written folder behind
    (back["b"] / "runs" / "lesion-fold1" / "trial_2" / "evaluation.npz").write_bytes(b"not an npz")
    real_summarize = merge_runs.summarize_trials

    def summarize_after_copying(run, *args, **kwargs):
        assert (Path(run) / "trial_2" / "evaluation.npz").is_file()  # the folder was being filled
        return real_summarize(run, *args, **kwargs)

    monkeypatch.setattr(merge_runs, "summarize_trials", summarize_after_copying)
    with pytest.raises(ValueError):
        merge_runs.merge(1, [back["a"], back["b"]], tmp_path / "broken")
    assert not (tmp_path / "broken").exists()


def test_bundled_development_part_is_what_training_reads(tmp_path, external):
    """The other hospitals' slices a GPU machine gets: every slice a training there reads (the
    development part, its figshare copies left out as in the shared folder) is there, and no slice
    of the validation part. (Copied under another folder name, the errata were not applied: the
    training there asked for 5 figshare copies that were never copied.)"""
    from neurocbir.data.external import load_external, part

    sys.path.insert(0, str(TOOLS))
    from bundle_external import copy_development

    out = copy_development(external, tmp_path)
    copied = {str(p.relative_to(out)) for p in out.rglob("*.jpg")} | {
        str(p.relative_to(out)) for p in out.rglob("*.png")
    }
    dev = part(load_external(external), "development")
    wanted = set(dev.files) | {m for m in dev.mask_files if m}
    assert set(part(load_external(out), "development").files) == set(dev.files)
    assert wanted <= copied and any(dev.mask_files)
    assert not copied & set(part(load_external(external), "validation").files)
