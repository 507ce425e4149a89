"""Search by a region the clinician draws (issue 42): regions are checked, the embedding pools over
the region, presence and the answer describe the region, the API, the CLI and the audit trail
take it. On the committed lesion model and real figshare fold-5 slices with their masks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from neurocbir.data.cases import CLASS_NAMES
from neurocbir.data.regions import (
    RegionError,
    away_box,
    box_region,
    mask_region,
    read_region_mask,
    region_on_grid,
    tumor_box,
)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tumor_slices(small_cases):
    """Fold-5 (never trained on) tumor slices: (row, image, mask)."""
    rows = np.flatnonzero(small_cases.fold == 5)
    out = [(int(r), small_cases.load_image(int(r)), small_cases.load_mask(int(r)) > 0) for r in rows]
    return [o for o in out if o[2].any()]


def test_bad_regions_are_refused_with_the_problem_named(tumor_slices):
    _, image, mask = tumor_slices[0]
    rows, cols = image.shape
    for box, problem in (
        ("10,10,10,40", "empty"),
        ("40,10,20,30", "empty"),
        (f"0,0,{cols + 5},20", "outside the image"),
        ("-3,0,20,20", "outside the image"),
        ("1,2,3", "four numbers"),
        ("a,b,c,d", "four numbers"),
        ("0,0,1,1", "at least"),
    ):
        with pytest.raises(RegionError, match=problem):
            box_region(box, image.shape)
    with pytest.raises(RegionError, match="the scan's size"):
        mask_region(mask[:-1].astype(np.uint8), image.shape)
    with pytest.raises(RegionError, match="not binary"):
        mask_region((image / image.max() * 255).astype(np.uint8), image.shape)
    with pytest.raises(RegionError, match="empty"):
        mask_region(np.zeros(image.shape, np.uint8), image.shape)
    with pytest.raises(RegionError, match="not an image"):
        read_region_mask(b"not a png", image.shape)
    # a true mask as a PNG (0 / 255) is the tumor; its box is the tumor's bounding box
    region = read_region_mask(_png(mask.astype(np.uint8) * 255), image.shape)
    assert region.pixels == int(mask.sum()) and region.box == tumor_box(mask)
    ys, xs = np.nonzero(mask)
    assert region.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    box = box_region(",".join(map(str, region.box)), image.shape)
    assert box.pixels == (region.box[2] - region.box[0]) * (region.box[3] - region.box[1])
    grid = region_on_grid(box, 224)
    assert grid.shape == (224, 224) and grid.min() >= 0 and grid.max() <= 1
    assert grid.sum() == pytest.approx(box.pixels * (224 / cols) * (224 / rows), rel=0.02)


def test_the_embedding_pools_over_the_drawn_region(bundled_service, tumor_slices, test_seed):
    """A region on the tumor embeds like the slice (whose embedding pools over the predicted
    tumor); a region away from it, elsewhere; the descriptor ("unlike the archive") is the slice's."""
    rng = np.random.default_rng(test_seed)
    model = bundled_service.model
    near, far = [], []
    for _, image, mask in tumor_slices[:6]:
        whole, desc, _ = model.analyse(image)
        on = region_on_grid(mask_region(mask.astype(np.uint8), image.shape), model.input_size)
        e_on, d_on, _ = model.analyse(image, on)
        away = away_box(image, mask, rng)
        assert away is not None
        off = region_on_grid(box_region(away, image.shape), model.input_size)
        e_off, _, _ = model.analyse(image, off)
        near.append(float(whole[0] @ e_on[0]))
        far.append(float(whole[0] @ e_off[0]))
        assert np.allclose(desc, d_on, atol=1e-5)
    # cosine distances: a region on the tumor moves the embedding little, one away from it much more
    near_d, far_d = 1 - np.array(near), 1 - np.array(far)
    assert np.median(near_d) < 0.01 and far_d.mean() > 5 * near_d.mean(), (near, far)


def test_search_by_the_tumor_box_and_by_a_box_away_from_it(bundled_service, small_cases, tumor_slices, test_seed):
    rng = np.random.default_rng(test_seed)
    right, none_away, n = 0, 0, 0
    for row, image, mask in tumor_slices:
        out = bundled_service.query(image, region=box_region(tumor_box(mask), image.shape))
        assert out["region"]["searched_by"] == "region" and out["region"]["box"] == list(tumor_box(mask))
        assert out["tumor_presence"]["probability_tumor_in_region"] is not None
        right += out["prediction"] == CLASS_NAMES[small_cases.label[row]]
        box = away_box(image, mask, rng)
        away = bundled_service.query(image, region=box_region(box, image.shape))
        if away["tumor_found"] is False:
            none_away += 1
            assert away["prediction"] is None and away["probabilities"] is None
            assert "drawn region" in away["note"]
            # the slice's own outline is still shown, as context
            assert away["query_tumor"] == bundled_service.query(image)["query_tumor"]
        n += 1
    assert right / n >= 0.8 and none_away / n >= 0.8, (right, none_away, n)
    whole = bundled_service.query(tumor_slices[0][1])
    assert whole["region"] is None


def test_no_tumor_is_claimed_for_a_region_only_where_the_decoder_locates_one_elsewhere(
    bundled_service, small_external, tumor_slices
):
    """Where the decoder outlines nothing on the slice it cannot say a region is free of tumor: the
    slice's own presence answer decides (on real other-hospital slices without a tumor, where the
    decoder stays silent); where it outlines a tumor elsewhere, the region is answered 'no tumor'."""
    from neurocbir.data.external import load_external

    threshold = bundled_service.region_search.threshold
    ext = load_external(small_external)
    silent = 0
    for i in np.flatnonzero(~ext.tumor):
        image = ext.load_image(int(i))
        if bundled_service.model.analyse(image)[2].max() >= threshold:
            continue
        rows, cols = image.shape[:2]
        box = (cols // 4, rows // 4, cols // 2, rows // 2)
        out = bundled_service.query(image, region=box_region(box, image.shape))
        whole = bundled_service.query(image)
        assert out["tumor_presence"]["located"] is False, out["tumor_presence"]
        assert "outlines no tumor anywhere" in out["tumor_presence"]["note"]
        assert out["tumor_found"] == whole["tumor_found"]
        assert out["tumor_presence"]["on_slice"] == whole["tumor_presence"]
        silent += 1
        if silent == 3:
            break
    assert silent == 3, f"only {silent} slices without a tumor where the decoder outlines nothing"
    # a tumor the decoder outlines: a box on the far side of the slice is answered "no tumor"
    for _, image, mask in tumor_slices:
        if bundled_service.model.analyse(image)[2].max() < 0.9:
            continue
        box = away_box(image, mask, np.random.default_rng(0))
        if box is None:
            continue
        out = bundled_service.query(image, region=box_region(box, image.shape))
        if out["tumor_presence"]["probability_tumor_in_region"] < threshold:
            assert out["tumor_presence"]["located"] is True and out["tumor_found"] is False
            assert out["prediction"] is None and "on_slice" not in out["tumor_presence"]
            return
    pytest.fail("no away box below the threshold on a slice whose tumor the decoder outlines")


def test_a_model_without_a_decoder_says_it_cannot_search_by_region(small_run, small_cases):
    from neurocbir.serving.service import RetrievalService

    service = RetrievalService.from_run(small_run, table=small_cases)
    image = small_cases.load_image(0)
    with pytest.raises(ValueError, match="cannot search by a drawn region"):
        service.query(image, region=box_region("10,10,60,60", image.shape))


@pytest.fixture(scope="module")
def audited(bundled_service, tmp_path_factory):
    from neurocbir.app.access import AccessControl
    from neurocbir.app.api import create_app
    from neurocbir.app.audit import AuditLog
    from neurocbir.app.users import UserStore

    folder = tmp_path_factory.mktemp("regions")
    users = UserStore(folder / "auth.db")
    token = users.add("reader-user", "reader")
    app = create_app(bundled_service, access=AccessControl(users=users, audit=AuditLog(folder / "audit.db")))
    return TestClient(app), {"Authorization": f"Bearer {token}"}, folder


def test_the_api_searches_by_a_box_or_a_mask_and_audits_the_region(audited, tumor_slices):
    import csv

    from neurocbir.app.audit import AuditLog

    client, headers, folder = audited
    _, image, mask = tumor_slices[0]
    scan = _png(np.clip(image / image.max() * 255, 0, 255).astype(np.uint8))
    box = ",".join(map(str, tumor_box(mask)))
    r = client.post("/query", files={"file": ("q.png", scan, "image/png")}, data={"region": box}, headers=headers)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["region"]["kind"] == "box" and len(out["region"]["outline"]) == 4
    last = list(csv.DictReader(io.StringIO(AuditLog(folder / "audit.db").export_csv())))[-1]
    assert last["route"] == "/query" and last["fingerprint"] == f"{out['query_fingerprint']} region box {box}"
    files = {"file": ("q.png", scan, "image/png"), "region_mask": ("m.png", _png(mask.astype(np.uint8) * 255))}
    r = client.post("/query", files=files, headers=headers)
    assert r.status_code == 200 and r.json()["region"]["kind"] == "mask", r.text
    assert r.json()["region"]["pixels"] == int(mask.sum())
    last = list(csv.DictReader(io.StringIO(AuditLog(folder / "audit.db").export_csv())))[-1]
    assert " region mask " in last["fingerprint"] and "sha256:" in last["fingerprint"]
    for form, extra, problem in (
        ({"region": "5,5,5,5"}, {}, "empty"),
        ({"region": f"0,0,{image.shape[1] + 1},10"}, {}, "outside the image"),
        ({}, {"region_mask": ("m.png", _png(mask[:-2].astype(np.uint8) * 255))}, "the scan's size"),
        ({}, {"region_mask": ("m.png", _png((image / image.max() * 255).astype(np.uint8)))}, "not binary"),
    ):
        r = client.post("/query", files={"file": ("q.png", scan, "image/png"), **extra}, data=form, headers=headers)
        assert r.status_code == 400 and problem in r.json()["detail"], r.text
    r = client.post(
        "/query",
        files={"file": ("q.png", scan, "image/png"), "region_mask": ("m.png", _png(mask.astype(np.uint8) * 255))},
        data={"region": box},
        headers=headers,
    )
    assert r.status_code == 422 and "not both" in r.text
    # the similarity map of a region search reads the region; its lesion share differs from the slice's
    case = out["retrievals"][0]["case_id"]
    whole = client.post(f"/similarity?case_id={case}", files={"file": ("q.png", scan, "image/png")}, headers=headers)
    drawn = client.post(
        f"/similarity?case_id={case}",
        files={"file": ("q.png", scan, "image/png")},
        data={"region": "0,0,40,40"},
        headers=headers,
    )
    assert whole.status_code == drawn.status_code == 200
    assert whole.headers["X-Lesion-Share"] != drawn.headers["X-Lesion-Share"]


def test_the_cli_searches_by_a_region(bundled_service, small_data_dir, small_cases, tumor_slices, tmp_path, test_seed):
    from typer.testing import CliRunner

    from neurocbir.cli import app as cli

    row, image, mask = tumor_slices[0]
    path = small_data_dir / "images" / f"{int(small_cases.idx[row])}.jpg"
    run = str(bundled_service.run)
    box = ",".join(map(str, tumor_box(mask)))
    res = CliRunner().invoke(cli, ["query", str(path), "--run", run, "--region", box])
    assert res.exit_code == 0, res.output
    assert f"searched by the drawn region (box {box}" in res.output
    mask_file = tmp_path / "mask.png"
    mask_file.write_bytes(_png(mask[:-1].astype(np.uint8) * 255))
    res = CliRunner().invoke(cli, ["query", str(path), "--run", run, "--region-mask", str(mask_file)])
    assert res.exit_code == 2 and "the scan's size" in res.output
    res = CliRunner().invoke(cli, ["query", str(path), "--run", run, "--region", "9,9,3,3"])
    assert res.exit_code == 2 and "empty" in res.output
    rng = np.random.default_rng(test_seed)  # a box away from the tumor that the service answers 'no tumor' for
    away = next(
        (b for b in (away_box(image, mask, rng) for _ in range(20)) if b is not None and
         bundled_service.query(image, region=box_region(b, image.shape))["tumor_found"] is False),
        None,
    )  # fmt: skip
    assert away is not None, "no away-from-tumor box was answered 'no tumor'"
    res = CliRunner().invoke(cli, ["query", str(path), "--run", run, "--region", ",".join(map(str, away))])
    decoder = bundled_service.region_search.decoder  # the peak is named by the decoder it was read from
    assert f"No tumor found in the drawn region ({decoder} decoder's peak there" in res.output, res.output


def test_a_region_drawn_on_one_slice_of_a_study(audited, bundled_service, small_cases, small_data_dir):
    """A series is answered as a study, and the slice the region was drawn on is searched by it too;
    a region without its slice is refused; the CLI does the same."""
    from typer.testing import CliRunner

    from neurocbir.cli import app as cli

    client, headers, _ = audited
    pid = small_cases.patient_id[np.flatnonzero(small_cases.fold == 5)[0]]
    rows = [int(r) for r in np.flatnonzero(small_cases.patient_id == pid)]
    i = next(j for j, r in enumerate(rows) if small_cases.load_mask(r).any())
    mask = small_cases.load_mask(rows[i]) > 0
    box = ",".join(map(str, tumor_box(mask)))
    paths = [small_data_dir / "images" / f"{int(small_cases.idx[r])}.jpg" for r in rows]
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    r = client.post("/query/study", files=files, data={"region": box, "region_slice": str(i)}, headers=headers)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["n_slices"] == len(rows) and out["region_search"]["slice"] == i
    assert out["region_search"]["region"]["box"] == list(tumor_box(mask))
    assert out["region_search"]["prediction"] == CLASS_NAMES[small_cases.label[rows[i]]]
    r = client.post("/query/study", files=files, data={"region": box}, headers=headers)
    assert r.status_code == 400 and "region_slice" in r.json()["detail"]
    res = CliRunner().invoke(
        cli,
        ["query-study", *map(str, paths), "--run", str(bundled_service.run), "--region", box, "--region-slice", str(i)],
    )
    assert res.exit_code == 0 and f"of slice {i}: {CLASS_NAMES[small_cases.label[rows[i]]]}" in res.output, res.output
