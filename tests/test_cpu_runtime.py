"""The OpenVINO-compiled lesion network (neurocbir.models.cpu_runtime) against PyTorch, on real slices:
the same embeddings, descriptors and tumor maps, hence the same neighbours; and no usage pings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from neurocbir.models import cpu_runtime
from neurocbir.models.inference import load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served():
    return load_model(ROOT / "models" / "lesion-fold5", trial=0)  # a fresh clone has no index yet


def _embed_with(monkeypatch, model, backend: str, images):
    monkeypatch.setenv("NEUROCBIR_BACKEND", backend)
    return model.embed(images), model.analyse(images[0])[2]


def test_openvino_matches_pytorch_and_retrieves_the_same_neighbours(served, small_cases, monkeypatch):
    rows = np.arange(len(small_cases))[:48]
    images = [small_cases.load_image(r) for r in rows]
    (emb_ov, desc_ov), prob_ov = _embed_with(monkeypatch, served, "openvino", images)
    assert cpu_runtime._compiled[(served.checkpoint_sha256, served.config.image_size, False)] is not None, (
        "not compiled"
    )
    (emb_pt, desc_pt), prob_pt = _embed_with(monkeypatch, served, "torch", images)
    np.testing.assert_allclose(emb_ov, emb_pt, atol=2e-5)
    np.testing.assert_allclose(desc_ov, desc_pt, atol=2e-5)
    np.testing.assert_allclose(prob_ov, prob_pt, atol=1e-4)
    # the first 8 slices as queries against the other 40: the same five neighbours, in order
    d_ov = ((emb_ov[:8, None] - emb_ov[None, 8:]) ** 2).sum(-1)
    d_pt = ((emb_pt[:8, None] - emb_pt[None, 8:]) ** 2).sum(-1)
    assert (np.argsort(d_ov, axis=1)[:, :5] == np.argsort(d_pt, axis=1)[:, :5]).all()
    # a query (one scan: its own fixed-shape network) and an odd batch give what the batch gave
    for n in (1, 3):
        (few, _), _ = _embed_with(monkeypatch, served, "openvino", images[:n])
        np.testing.assert_allclose(few, emb_ov[:n], atol=2e-5)


def test_a_query_runs_on_a_network_compiled_for_its_own_batch_size(served, small_cases, monkeypatch):
    """One scan (with its mirror: a batch of two) takes the fixed-shape network; the outputs are
    the any-size network's, bit for bit."""
    monkeypatch.setenv("NEUROCBIR_BACKEND", "openvino")
    forward = cpu_runtime.compile_net(served.net, served.config.image_size, served.checkpoint_sha256)
    x = np.stack([served.prepare(small_cases.load_image(r)).numpy() for r in range(2)])
    fixed = forward(x)
    monkeypatch.setattr(cpu_runtime, "FIXED_BATCHES", ())
    anysize = forward(x)
    for a, b in zip(fixed, anysize, strict=True):
        np.testing.assert_array_equal(a, b)
    nets = forward.networks  # the fixed-shape network was built: its input has a static shape
    assert [tuple(p.get_shape()) for p in nets[2].inputs] == [
        (2, 3, served.config.image_size, served.config.image_size)
    ]
    assert nets[None].inputs[0].get_partial_shape().is_dynamic


def test_backend_is_checked(monkeypatch, served):
    monkeypatch.setenv("NEUROCBIR_BACKEND", "torch")
    assert cpu_runtime.compile_net(served.net, served.config.image_size, "any") is None
    monkeypatch.setenv("NEUROCBIR_BACKEND", "tensorrt")
    with pytest.raises(ValueError, match="NEUROCBIR_BACKEND"):
        cpu_runtime.backend()


def test_openvino_sends_no_usage_event(tmp_path):
    """`import openvino` alone writes a client id under ~/intel and queues an analytics event;
    through neurocbir it does neither."""
    for name, code, pings in (
        ("plain", "import openvino; openvino.Core()", True),  # the premise, so this test can fail
        ("ours", "from neurocbir.models.cpu_runtime import _import_openvino; _import_openvino().Core()", False),
    ):
        home = tmp_path / name
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}  # CI: no pings
        env["HOME"] = str(home)
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
        assert (home / "intel").exists() == pings, name


def test_a_region_search_compiles_to_the_same_embedding(served, small_cases, monkeypatch):
    """The region graph (a second input: the region to pool over) gives PyTorch's embedding too."""
    from neurocbir.data.regions import box_region, region_on_grid, tumor_box

    rows = [r for r in range(len(small_cases)) if small_cases.load_mask(r).any()][:6]
    out = {}
    for backend in ("openvino", "torch"):
        monkeypatch.setenv("NEUROCBIR_BACKEND", backend)
        out[backend] = [
            served.analyse(image, region_on_grid(box_region(tumor_box(mask), image.shape), served.input_size))[0]
            for image, mask in ((small_cases.load_image(r), small_cases.load_mask(r) > 0) for r in rows)
        ]
    assert cpu_runtime._compiled[(served.checkpoint_sha256, served.config.image_size, True)] is not None
    np.testing.assert_allclose(np.concatenate(out["openvino"]), np.concatenate(out["torch"]), atol=2e-5)
