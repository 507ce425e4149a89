"""`neurocbir presence-decoder RUN`: a second tumor decoder, trained on the frozen network, whose
peak the "no tumor" rule reads; the embedding, the outline and the neighbours stay the run's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from neurocbir.cli import app as cli
from neurocbir.data.external import development_split, load_external
from neurocbir.data.regions import box_region, region_on_grid, region_peak
from neurocbir.training.presence_decoder import _encoding_weights, _relabel_index

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_lesion_run(tmp_path_factory, small_data_dir, small_external) -> Path:
    """A copy of the committed model without its presence decoder, whose config reads the small
    dataset and the small external folder (what a presence decoder trains on), indexed over the
    small dataset."""
    import torch

    from neurocbir.retrieval.ingest import index_run

    run = tmp_path_factory.mktemp("presence-decoder") / "run"
    ignore = shutil.ignore_patterns(
        "embeddings.npz", "index.faiss*", "metrics.*", "demo-archive", "*.png", "presence_decoder.json"
    )
    shutil.copytree(ROOT / "models" / "lesion-fold5", run, ignore=ignore)
    ckpt = run / "trial_0" / "checkpoint.pt"
    blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    blob["state"] = {k: v for k, v in blob["state"].items() if not k.startswith("presence_decoder.")}
    blob["config"] |= {"data": str(small_data_dir), "extra_cases": str(small_external)}
    torch.save(blob, ckpt)
    (run / "config.json").write_text(json.dumps(blob["config"]))
    index_run(run, small_data_dir)
    return run


def test_a_presence_decoder_changes_the_presence_evidence_alone(
    small_lesion_run, small_cases, small_data_dir, small_external
):
    """Before: the presence evidence is the tumor map's peak. After `neurocbir presence-decoder`:
    the embedding, the descriptor and the outline map are the same, the presence evidence is another
    decoder's, the app's "no tumor" rule reads that one, and the run records how it was trained."""
    from neurocbir.models.inference import load_model
    from neurocbir.serving.service import RetrievalService

    run = small_lesion_run
    ext = load_external(small_external)
    held = development_split(ext)[1]
    images = [small_cases.load_image(i) for i in np.flatnonzero(small_cases.fold == 5)[:4]]
    images += [ext.load_image(int(i)) for i in held if not ext.tumor[i]][:4]
    e0, d0, p0, k0 = load_model(run).analyse_batch(images, presence=True)
    stored = dict(np.load(run / "trial_0" / "embeddings.npz"))
    assert all(np.array_equal(a, b) for a, b in zip(k0, p0, strict=True))  # no presence decoder: the tumor map

    trained = runner.invoke(cli, ["presence-decoder", str(run), "--epochs", "1"])
    assert trained.exit_code == 0, trained.output
    info = json.loads((run / "presence_decoder.json").read_text())
    assert info["epochs"] == 1 and info["slices"] > 0 and info["rule"] in trained.output
    rule = json.loads((run / "presence.json").read_text())  # chosen again, on the new decoder's peaks
    assert rule != json.loads((ROOT / "models" / "lesion-fold5" / "presence.json").read_text())

    e1, d1, p1, k1 = load_model(run).analyse_batch(images, presence=True)
    assert np.allclose(e1, e0, atol=1e-5) and np.allclose(d1, d0, atol=1e-5)
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(p0, p1, strict=True))
    # the embeddings are unchanged, so the index is kept and keyed to the new checkpoint, not re-embedded
    assert info["index"] == "re-labelled" and "re-labelled its index" in trained.output, trained.output
    assert (
        load_model(run).checkpoint_sha256
        == json.loads((run / "trial_0" / "index.faiss.json").read_text())["checkpoint_sha256"]
    )
    kept = np.load(run / "trial_0" / "embeddings.npz")
    assert all(np.array_equal(kept[k], v) for k, v in stored.items())
    # a network whose encoding weights changed is never re-labelled (it is re-embedded)
    new_sha, state = load_model(run).checkpoint_sha256, _encoding_weights(run / "trial_0" / "checkpoint.pt")
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] + 1
    assert not _relabel_index(run, 0, {new_sha: False}, state)
    assert _relabel_index(run, 0, {new_sha: False}, _encoding_weights(run / "trial_0" / "checkpoint.pt"))
    outline_peaks, presence_peaks = np.array([p.max() for p in p1]), np.array([m.max() for m in k1])
    assert np.abs(presence_peaks - outline_peaks).max() > 1e-3, (presence_peaks, outline_peaks)

    archive = run.parent / "archive"  # slices without a tumor too: presence is assessed
    for args in ([str(small_data_dir), "--fold", "1"], [str(small_external), "--part", "development"]):
        res = runner.invoke(cli, ["add", *args, "--archive", str(archive), "--run", str(run)])
        assert res.exit_code == 0, res.output
    (run / "presence.json").write_text(json.dumps({"threshold": 0.5, "decoder_veto": 0.5, "how": "test"}))
    svc = RetrievalService.from_archive(run, archive)
    for image, peak in zip(images, presence_peaks, strict=True):
        evidence = svc.query(image)["tumor_presence"]  # a rule with a decoder veto shows the peak it read
        assert evidence["decoder_peak"] == pytest.approx(float(peak), abs=1e-3), evidence
        assert "the presence decoder's peak reaches the veto" in evidence["note"], evidence

    # the region search was fitted again on both decoders' maps: a drawn region reads the one chosen
    fitted = json.loads((run / "region_search.json").read_text())
    assert set(fitted["measured"]["decoders"]) == {"tumor", "presence"} and fitted["decoder"] in trained.output
    print("region search reads the", fitted["decoder"], "decoder:", fitted["measured"]["decoders"])
    differ = 0
    for image, tumor_map, presence_map in zip(images, p1, k1, strict=True):
        region = box_region((0, 0, image.shape[1] // 2, image.shape[0] // 2), image.shape)
        grid = region_on_grid(region, svc.model.input_size)
        seen = {"tumor": tumor_map, "presence": presence_map}[fitted["decoder"]]
        shown = svc.query(image, region=region)["tumor_presence"]
        assert shown["probability_tumor_in_region"] == pytest.approx(region_peak(seen, grid), abs=1e-3), shown
        differ += abs(region_peak(tumor_map, grid) - region_peak(presence_map, grid)) > 1e-2
    assert differ, "the two maps agree in every region: the test cannot tell which one was read"


def test_a_presence_decoder_needs_a_lesion_run(tmp_path, small_run):
    """A folder that is no run, or a run without a tumor decoder, is refused by name, without a
    traceback, and the run is left as it was."""
    res = runner.invoke(cli, ["presence-decoder", str(tmp_path)])
    assert res.exit_code != 0 and "not a run directory" in res.output and "Traceback" not in res.output
    before = {p.name: p.stat().st_mtime_ns for p in small_run.rglob("*")}
    res = runner.invoke(cli, ["presence-decoder", str(small_run)])
    assert res.exit_code != 0 and "only a lesion run" in res.output and "Traceback" not in res.output
    assert {p.name: p.stat().st_mtime_ns for p in small_run.rglob("*")} == before


def test_a_presence_decoder_can_draw_sources_evenly_and_paste_tumors(small_cases, small_external, test_seed):
    """The presence decoder's drawing weights give each source's tumor and no-tumor slices the
    same weight (each source keeping its share); a pasted tumor is a donor's masked tumor, inside
    the receiving head, which changes the slice only near that mask and makes it a tumor slice
    with the donor's mask; tumor slices and slices left without a paste are untouched."""
    import torch

    from neurocbir.data.cases import NO_TUMOR_LABEL
    from neurocbir.training.lesion import load_extra_tensors, load_tensors
    from neurocbir.training.presence_decoder import balanced_weights, paste_tumors

    ext = load_external(small_external)
    w = balanced_weights(
        np.r_[np.full(len(small_cases), "figshare"), ext.sources], np.r_[small_cases.label < 3, ext.tumor]
    )
    for src in np.unique(ext.sources):
        at = np.r_[np.zeros(len(small_cases), bool), ext.sources == src]
        tumor = np.r_[np.ones(len(small_cases), bool), ext.tumor]
        assert w[at & tumor].sum() == pytest.approx(w[at & ~tumor].sum())
        assert w[at].sum() == pytest.approx(at.mean())
    fx, fm = load_tensors(small_cases, 224)
    ex, em, ey, ek = load_extra_tensors(small_external, 224)
    images, masks = torch.cat([fx, ex]).float(), torch.cat([fm, em]).float()
    y = torch.as_tensor(np.r_[small_cases.label, ey])
    known = torch.cat([torch.ones(len(fx), dtype=torch.bool), ek])
    donors = torch.nonzero(known & (masks.flatten(1).amax(1) > 0)).flatten()
    print("seed", test_seed)
    gen = torch.Generator().manual_seed(test_seed)
    x2, m2, y2, k2 = paste_tumors(images, masks, y.clone(), known.clone(), images, masks, donors, 0.5, gen)
    pasted = torch.nonzero(y2 != y).flatten()
    was_none = int((y == NO_TUMOR_LABEL).sum())
    assert 0.25 * was_none <= len(pasted) <= 0.75 * was_none, (len(pasted), was_none)
    assert bool((y[pasted] == NO_TUMOR_LABEL).all()) and bool(k2[pasted].all())
    untouched = torch.ones(len(y), dtype=torch.bool)
    untouched[pasted] = False
    assert torch.equal(x2[untouched], images[untouched]) and torch.equal(m2[untouched], masks[untouched])
    for i in pasted.tolist():
        mask = m2[i, 0] > 0
        assert any(torch.equal(m2[i], masks[d]) or torch.equal(m2[i], masks[d].flip(-1)) for d in donors.tolist())
        assert (images[i, 0][mask] > -0.9).float().mean() >= 0.95  # inside the receiving head
        near = torch.nn.functional.max_pool2d(mask[None, None].float(), 9, 1, 4)[0, 0] > 0
        assert torch.equal(x2[i, 0][~near], images[i, 0][~near]) and not torch.equal(x2[i, 0][mask], images[i, 0][mask])


def test_the_sources_drawn_evenly_line_up_with_the_slices_trained_on(small_lesion_run, small_cases, small_external):
    """`--balance` reads each training slice's source: figshare's training patients, then the
    development slices the run trains on, one source per slice, in the order they are appended."""
    from neurocbir.data.cases import NO_TUMOR_LABEL
    from neurocbir.models.runs import TrainConfig
    from neurocbir.training.holdout import holdout_split
    from neurocbir.training.lesion_run import extra_training_cases
    from neurocbir.training.presence_decoder import _sources

    cfg = TrainConfig(**json.loads((small_lesion_run / "config.json").read_text()))
    fit_rows, _ = holdout_split(cfg, small_cases)
    extra, _ = extra_training_cases(cfg)
    sources = _sources(cfg, len(fit_rows))
    assert len(sources) == len(fit_rows) + len(extra[2])
    assert set(sources[: len(fit_rows)]) == {"figshare"}
    assert set(sources[len(fit_rows) :]) == set(load_external(small_external).sources.astype(str))
    # TCGA's tumor slices are the tumor slices appended with a mask: the sources and the masks agree
    tumor = extra[2] != NO_TUMOR_LABEL
    assert np.array_equal((sources[len(fit_rows) :] == "tcga-lgg") & tumor, extra[3].numpy() & tumor)


def test_a_presence_decoder_with_its_own_trunk_branch_leaves_the_run_alone(
    small_lesion_run, tmp_path, small_cases, small_external, monkeypatch, test_seed
):
    """A presence decoder with its own branch (`neurocbir presence-decoder RUN --branch`) gets a copy
    of the trunk's stages after stride 8 and trains them; the run's trunk, embedding, descriptor and
    outline map stay as they were, the copied stages no longer equal the run's, and the network
    compiled as the app runs it gives the same presence map as PyTorch."""
    import torch

    from neurocbir.models.inference import load_model
    from neurocbir.training.lesion import load_extra_tensors, load_tensors, save_checkpoint
    from neurocbir.training.presence_decoder import _load_trainable, train_presence_decoder

    run = tmp_path / "run"
    shutil.copytree(small_lesion_run, run)
    ckpt = run / "trial_0" / "checkpoint.pt"
    ext = load_external(small_external)
    images = [small_cases.load_image(i) for i in np.flatnonzero(small_cases.fold == 5)[:3]]
    images += [ext.load_image(int(i)) for i in development_split(ext)[1] if not ext.tumor[i]][:3]
    e0, d0, p0, _ = load_model(run).analyse_batch(images, presence=True)

    cfg, net, weights_sha256 = _load_trainable(run, ckpt)
    fx, fm = load_tensors(small_cases, cfg.image_size, cfg.intensity)
    ex, em, ey, ek = load_extra_tensors(small_external, cfg.image_size, intensity=cfg.intensity)
    known = torch.cat([torch.ones(len(fx), dtype=torch.bool), ek])
    print("seed", test_seed)
    train_presence_decoder(
        net, torch.cat([fx, ex]), torch.cat([fm, em]), np.r_[small_cases.label, ey], known, test_seed, 1,
        progress=False, branch=True,
    )  # fmt: skip
    save_checkpoint(ckpt, cfg, net, weights_sha256)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state"]
    start = net.taps[1] + 1
    branch = {k.removeprefix("presence_decoder.trunk."): v for k, v in state.items() if ".trunk." in k}
    copied = {f"{int(k.split('.')[0]) + start}.{k.split('.', 1)[1]}": v for k, v in branch.items()}
    assert branch and all(f"trunk.{k}" in state for k in copied)
    changed = [k for k, v in copied.items() if v.is_floating_point() and not torch.equal(v, state[f"trunk.{k}"])]
    assert changed, "the branch was not trained"

    e1, d1, p1, k1 = load_model(run).analyse_batch(images, presence=True)
    assert np.allclose(e1, e0, atol=1e-5) and np.allclose(d1, d0, atol=1e-5)
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(p0, p1, strict=True))
    assert max(abs(float(a.max()) - float(b.max())) for a, b in zip(k1, p1, strict=True)) > 1e-3
    monkeypatch.setenv("NEUROCBIR_BACKEND", "torch")  # the compiled network runs the branch as PyTorch does
    _, _, _, k2 = load_model(run).analyse_batch(images, presence=True)
    assert all(np.allclose(a, b, atol=1e-4) for a, b in zip(k1, k2, strict=True))
