"""The development slices a run holds out of training, less those that twin a slice it trained on."""

from __future__ import annotations

import shutil

import numpy as np
from PIL import Image

from neurocbir.data.external import load_external, part
from neurocbir.models.runs import TrainConfig
from neurocbir.retrieval.duplicates import DuplicateIndex
from neurocbir.training.holdout import development_holdout, extra_holdout_split


def test_a_held_out_slice_that_mirrors_a_trained_on_one_is_left_out_and_the_answer_is_kept(
    small_data_dir, small_cases, small_external, tmp_path, monkeypatch
):
    """A held-out development slice replaced by the mirror image of a slice the run trains on is
    left out (the other held-out slices stay); asked again, the answer is read back, not computed
    (calibration, the presence choice and `neurocbir presence-decoder` each ask); a file changed
    since is checked anew."""
    monkeypatch.setenv("NEUROCBIR_CACHE", str(tmp_path / "cache"))
    ext = tmp_path / "external"
    shutil.copytree(small_external, ext)
    cfg = TrainConfig(
        recipe="lesion", data=str(small_data_dir), extra_cases=str(ext), holdout_extra=True, holdout_patients=0.15
    )
    dev = part(load_external(ext), "development")
    fit, held = extra_holdout_split(cfg, dev)
    before = development_holdout(cfg, small_cases)
    assert before[3] == 0 and before[2].tolist() == held.tolist(), before[2:]  # no twins in the copy as made

    victim, donor = int(held[0]), int(fit[0])
    with Image.open(dev.path(donor)) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(dev.path(victim), format=im.format)
    _, fit_rows, kept, n_twins = development_holdout(cfg, small_cases)
    assert fit_rows.tolist() == fit.tolist() and n_twins == 1 and kept.tolist() == held[1:].tolist()

    files = sorted((tmp_path / "cache" / "twins").glob("*.json"), key=lambda f: f.stat().st_mtime_ns)
    assert len(files) == 2  # one per state of the files: before and after the change
    files[-1].write_text('{"kept": [1, ')  # a damaged file is computed again, never trusted
    assert development_holdout(cfg, small_cases)[2].tolist() == kept.tolist()

    def not_again(*args, **kwargs):
        raise AssertionError("the duplicate check ran again")

    monkeypatch.setattr(DuplicateIndex, "of_images", not_again)
    again = development_holdout(cfg, small_cases)
    assert np.array_equal(again[2], kept) and again[3] == 1
