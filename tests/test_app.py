"""HTTP API and CLI over a real trained run: real images through the real model and index."""

from __future__ import annotations

import io
import json

import h5py
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from neurocbir.app.api import create_app
from neurocbir.cli import app as cli
from neurocbir.data.cases import CLASS_NAMES
from neurocbir.serving.service import RetrievalService


@pytest.fixture(scope="module")
def service(small_run, small_cases):
    return RetrievalService.from_run(small_run, table=small_cases)


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service))


@pytest.fixture(scope="module")
def test_case(service, small_cases):
    row = int(service.cases.example_rows[0])
    return row, (small_cases.loader.root / "images" / f"{int(small_cases.idx[row])}.jpg").read_bytes()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["archive_cases"] > 50


def test_query_contract(client, test_case, small_cases):
    _, jpeg = test_case
    r = client.post("/query?k=5", files={"file": ("scan.jpg", jpeg, "image/jpeg")})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["prediction"] in CLASS_NAMES and 0 < out["confidence"] <= 1
    assert set(out["probabilities"]) <= set(CLASS_NAMES) and sum(out["probabilities"].values()) == pytest.approx(
        1, abs=1e-3
    )
    assert len(out["retrievals"]) == 5
    d = [x["distance"] for x in out["retrievals"]]
    assert d == sorted(d)
    for rank, x in enumerate(out["retrievals"], 1):
        assert set(x) == {"case_id", "label", "plane", "area_mm2", "distance", "rank", "same_image_as_query"}
        assert x["label"] in CLASS_NAMES and x["rank"] == rank  # no re-ranking asked for
    # NIR confidence is the softmax of I_c: the winner's I_c leading retrievals share its label
    ic = out["nir_positions"][out["prediction"]]
    assert all(x["label"] == out["prediction"] for x in out["retrievals"][: min(ic, 5)])
    assert "not a diagnosis" in out["disclaimer"]
    # no patient identifier anywhere in the answer
    assert not any(pid in r.text for pid in set(small_cases.patient_id.tolist()))


def test_same_scan_in_every_format_gives_the_same_answer(client, test_case, small_cases, tmp_path):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    row, _ = test_case
    img = small_cases.load_image(row).astype(np.uint8)
    png = client.post("/query", files={"file": ("s.png", _png(img), "image/png")}).json()
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset("s.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = (img.astype(np.uint16) * 8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    dcm = client.post("/query", files={"file": ("s.dcm", buf.getvalue(), "application/dicom")}).json()
    mat = tmp_path / "s.mat"
    with h5py.File(mat, "w") as f:
        f.create_group("cjdata")["image"] = (img.astype(np.int16) * 4).T
    m = client.post("/query", files={"file": ("s.mat", mat.read_bytes(), "application/octet-stream")}).json()
    ids = [x["case_id"] for x in png["retrievals"]]
    assert [x["case_id"] for x in dcm["retrievals"]] == ids
    assert [x["case_id"] for x in m["retrievals"]] == ids
    assert png["prediction"] == dcm["prediction"] == m["prediction"]


def _pixelless_dicom() -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset("r.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality = "SR"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _bad_inputs(test_case, tmp_path):
    _, jpeg = test_case
    big = io.BytesIO()
    Image.new("L", (8000, 6250)).save(big, format="PNG")  # 50 megapixels, a small file
    wrong_mat = tmp_path / "w.mat"
    with h5py.File(wrong_mat, "w") as f:
        f["something"] = np.zeros((4, 4))
    return {
        "empty": ("e.png", b"", 400, "empty"),
        "truncated jpeg": ("t.jpg", jpeg[: len(jpeg) // 3], 400, "corrupt or truncated"),
        "not an image": ("notes.txt", b"this is a radiology report, not an image", 400, "not a readable image"),
        "50 megapixels": ("big.png", big.getvalue(), 400, "megapixels"),
        "dicom without pixels": ("r.dcm", _pixelless_dicom(), 400, "no pixel data"),
        "wrong mat layout": ("w.mat", wrong_mat.read_bytes(), 400, "no cjdata.image"),
        "too large": ("huge.png", b"\x89PNG" + b"\0" * (21 * 1024 * 1024), 413, "Too Large"),
    }


def test_bad_uploads_get_clear_4xx_and_the_server_keeps_serving(client, test_case, tmp_path):
    for name, (fname, data, status, msg) in _bad_inputs(test_case, tmp_path).items():
        r = client.post("/query", files={"file": (fname, data, "application/octet-stream")})
        assert r.status_code == status, (name, r.text)
        assert msg in (r.json()["detail"] if status != 413 else r.text), (name, r.text)  # 413: FastAPI's own text
    assert client.get("/health").status_code == 200
    assert client.post("/query", files={"file": ("ok.jpg", test_case[1], "image/jpeg")}).status_code == 200
    assert client.post("/query").status_code == 422
    assert client.post("/query?k=0", files={"file": ("ok.jpg", test_case[1], "image/jpeg")}).status_code == 422


def test_summary_ask_and_cases(client, test_case, small_cases):
    row, jpeg = test_case
    q = client.post("/query", files={"file": ("scan.jpg", jpeg, "image/jpeg")}).json()
    ids = [x["case_id"] for x in q["retrievals"]]
    body = {"case_ids": ids, "query_case_id": int(small_cases.idx[row]), "style": "alternative"}
    s = client.post("/summary", json=body).json()
    assert s["facts"]["n_reports"] == 5 and len(s["reports"]) == 5
    largest = max(range(5), key=lambda i: q["retrievals"][i]["area_mm2"])
    a = client.post("/ask", json={**body, "question": "Which retrieved report shows the largest tumor?"}).json()
    assert a["reports"] == [largest + 1] and a["value_mm2"] == pytest.approx(q["retrievals"][largest]["area_mm2"])
    c = client.get(f"/cases/{ids[0]}").json()
    assert c["label"] == q["retrievals"][0]["label"] and "report" in c and c["in_archive"]
    img = client.get(f"/cases/{ids[0]}/image.png?outline=true")
    assert img.status_code == 200 and img.content[:4] == b"\x89PNG"
    assert client.get("/cases/999999").status_code == 404
    assert client.post("/summary", json={**body, "style": "fancy"}).status_code == 422
    assert client.post("/ask", json={**body, "case_ids": [999999], "question": "?"}).status_code == 404


def test_cli_query_contract(small_run, test_case, tmp_path, small_data_dir, monkeypatch):
    _, jpeg = test_case
    p = tmp_path / "scan.jpg"
    p.write_bytes(jpeg)
    monkeypatch.setenv("NEUROCBIR_DATA", str(small_data_dir))
    res = CliRunner().invoke(cli, ["query", str(p), "--run", str(small_run), "--k", "5", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert {"prediction", "confidence", "probabilities", "retrievals"} <= set(out) and len(out["retrievals"]) == 5
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    res = CliRunner().invoke(cli, ["query", str(bad), "--run", str(small_run)])
    assert res.exit_code == 2 and "not a readable image" in res.output
    res = CliRunner().invoke(
        cli,
        ["ask", str(p), "What is the average tumor size in the retrieved reports?", "--run", str(small_run), "--json"],
    )
    assert res.exit_code == 0 and json.loads(res.output)["value_mm2"] > 0


def test_a_scan_unlike_any_archive_case_is_flagged(client, test_case):
    from skimage import data

    r = client.post("/query", files={"file": ("mri.jpg", test_case[1], "image/jpeg")}).json()
    assert r["no_similar_case"] is False and r["calibrated"] and r["calibration_applies"]
    for photo in (data.chelsea(), data.camera()):
        r = client.post("/query", files={"file": ("photo.png", _png(photo), "image/png")}).json()
        assert r["no_similar_case"] is True and r["nearest_distance"] > 0
        # the calibration was fitted on scans like the archive's: for this one no class is ruled out
        assert r["calibration_applies"] is False and r["prediction_set"] == list(r["probabilities"])


def test_the_cli_shows_no_confidence_for_a_scan_unlike_the_archive(small_run, tmp_path):
    from skimage import data

    photo = tmp_path / "photo.png"
    photo.write_bytes(_png(data.chelsea()))
    res = CliRunner().invoke(cli, ["query", str(photo), "--run", str(small_run)])
    assert res.exit_code == 0, res.output
    assert "confidence withheld" in res.output and "calibrated confidence" not in res.output
    assert "no similar case found" in res.output
    res = CliRunner().invoke(
        cli, ["ask", str(photo), "What is the average tumor size?", "--run", str(small_run), "--json"]
    )
    assert res.exit_code == 0 and "no similar case found" in res.stderr
    assert json.loads(res.stdout)["value_mm2"] > 0  # the reports are still answered for


def test_one_search_per_query_scores_nir_and_knn_like_the_estimators(service, small_cases, monkeypatch):
    """A query embeds once and searches the archive once; NIR, I_c and the KNN vote all come
    from that one neighbour list and equal what the scikit-learn estimators compute."""
    from neurocbir.classify.neighbors import KNNClassifier, NIRClassifier

    index, searches = service.cases.store, []
    search = index.search
    monkeypatch.setattr(index, "search", lambda q, k: searches.append(k) or search(q, k))
    emb = np.load(service.run / f"trial_{service.trial}" / "embeddings.npz")
    labels = small_cases.label[emb["archive_rows"]]
    nir = NIRClassifier().fit(emb["archive"], labels)
    knn = KNNClassifier(n_neighbors=7).fit(emb["archive"], labels)
    for row in service.cases.example_rows[:6]:
        searches.clear()
        out = service.query(small_cases.load_image(int(row)), k=5)
        assert len(searches) == 1
        q, _, _ = service.analyse(small_cases.load_image(int(row)))
        names = [CLASS_NAMES[c] for c in nir.classes_]
        assert out["nir_positions"] == dict(zip(names, nir.incorrect_positions(q)[0].tolist()))
        # (the probabilities shown are calibrated: tests/test_calibration.py checks them)
        assert out["knn_vote"] == pytest.approx(dict(zip(names, knn.predict_proba(q)[0])), abs=1e-4)


def test_the_query_path_does_not_import_training():
    """Service, app and CLI query path load a model through neurocbir.models.inference only."""
    import subprocess
    import sys

    code = (
        "import sys, neurocbir.app.api, neurocbir.serving.service, neurocbir.serving.sources, neurocbir.retrieval.ingest, "
        "neurocbir.cli.querying, neurocbir.cli.archive; "
        "print(sorted(m for m in sys.modules if m.startswith('neurocbir.training') or m == 'pytorch_metric_learning'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_feedback_is_stored_exported_and_reranks(tmp_path, small_run, small_cases):
    """POST /feedback stores a mark durably (a new service on the same file sees it), /feedback.csv
    exports it without patient data, and rerank=true moves marked cases."""
    from fastapi.testclient import TestClient

    from neurocbir.serving.service import RetrievalService

    db = tmp_path / "feedback.db"
    svc = RetrievalService.from_run(small_run)
    svc.feedback_path = db
    client = TestClient(create_app(svc))
    row = int(small_cases.fold.tolist().index(5))
    path = small_cases.loader.image_path(int(small_cases.idx[row]))
    files = {"file": (path.name, path.read_bytes(), "image/jpeg")}
    out = client.post("/query?k=5", files=files).json()
    fp, shown = out["query_fingerprint"], [r["case_id"] for r in out["retrievals"]]
    assert len(fp) == 32 and [r["rank"] for r in out["retrievals"]] == [1, 2, 3, 4, 5]
    # the nearest case marked not relevant twice, the fifth relevant twice
    for case, relevant in ((shown[0], False), (shown[0], False), (shown[4], True), (shown[4], True)):
        assert client.post("/feedback", json={"query_fingerprint": fp, "case_id": case, "relevant": relevant}).json()[
            "stored"
        ]
    assert (
        client.post("/feedback", json={"query_fingerprint": fp, "case_id": 10**7, "relevant": True}).status_code == 404
    )
    assert (
        client.post(
            "/feedback", json={"query_fingerprint": "x" * 32, "case_id": shown[1], "relevant": True}
        ).status_code
        == 400
    )
    reranked = client.post("/query?k=5&rerank=true", files=files).json()
    order = [r["case_id"] for r in reranked["retrievals"]]
    assert reranked["reranked_by_feedback"] and order != shown
    assert order.index(shown[4]) < 4 and (shown[0] not in order or order.index(shown[0]) > 0)
    assert reranked["prediction"] == out["prediction"]  # feedback orders the evidence, not the diagnosis
    csv_text = client.get("/feedback.csv").text.splitlines()
    assert csv_text[0] == "id,time,query_fingerprint,case_id,relevant,user" and len(csv_text) == 5
    assert all(small_cases.patient_id[0] not in line for line in csv_text)
    again = RetrievalService.from_run(small_run)  # durable: a new process sees the marks
    again.feedback_path = db
    assert again.feedback.count() == 4


def test_filters_show_only_matching_cases_and_keep_the_prediction(client, test_case, small_cases):
    """Plane, type and size filters on the shown retrievals (inside the index); the prediction is
    the unfiltered one; bad filters get a 400, an empty match an empty list."""
    _, jpeg = test_case
    files = {"file": ("scan.jpg", jpeg, "image/jpeg")}
    plain = client.post("/query?k=5", files=files).json()
    areas = sorted(small_cases.area_mm2)
    lo, hi = float(areas[len(areas) // 4]), float(areas[3 * len(areas) // 4])
    out = client.post(
        f"/query?k=5&plane=axial&tumor_type=glioma&min_area_mm2={lo}&max_area_mm2={hi}", files=files
    ).json()
    assert out["filters"] == {"plane": "axial", "tumor_type": "glioma", "min_area_mm2": lo, "max_area_mm2": hi}
    assert out["prediction"] == plain["prediction"] and out["probabilities"] == plain["probabilities"]
    assert out["retrievals"], "some small-archive case should pass"
    for r in out["retrievals"]:
        assert r["plane"] == "axial" and r["label"] == "glioma" and lo <= r["area_mm2"] <= hi
    assert [r["distance"] for r in out["retrievals"]] == sorted(r["distance"] for r in out["retrievals"])
    dedup = client.post("/query?k=5&tumor_type=meningioma&one_per_patient=true", files=files).json()
    keys = [r["case_id"] for r in dedup["retrievals"]]
    pids = [small_cases.patient_id[list(small_cases.idx).index(c)] for c in keys]
    assert len(set(pids)) == len(pids) and all(r["label"] == "meningioma" for r in dedup["retrievals"])
    assert client.post("/query?plane=oblique", files=files).status_code == 400
    assert client.post("/query?min_area_mm2=500&max_area_mm2=100", files=files).status_code == 400
    assert client.post("/query?min_area_mm2=1000000", files=files).json()["retrievals"] == []
