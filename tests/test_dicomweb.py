"""PACS integration against a real Orthanc server (Debian's orthanc + orthanc-dicomweb) on
loopback: figshare slices converted to DICOM are stored over STOW-RS, ingested with
`neurocbir add --dicomweb` (de-identified, resumable after SIGKILL), and queried by SOP
Instance UID from the CLI and the HTTP API. `pytest -k dicomweb` selects these tests."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from neurocbir.cli import app as cli
from neurocbir.data.cases import CLASS_NAMES
from neurocbir.retrieval.archive import CaseArchive
from neurocbir.retrieval.dicomweb import PacsError, client, read_instance, to_dicom
from tests.orthanc import free_port, installed, running_orthanc

USER, PASSWORD = "neurocbir", "pacs-secret"
N_LABELLED = 40


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A real Orthanc PACS with its DICOMweb plugin, on loopback, with HTTP basic auth."""
    if not installed():
        pytest.fail(
            "Orthanc is not installed: apt-get install orthanc orthanc-dicomweb"
        )  # never a skip: `make test` installs it
    with running_orthanc(tmp_path_factory.mktemp("orthanc"), USER, PASSWORD) as url:
        yield url


@pytest.fixture(scope="module")
def pacs(orthanc, small_cases, tmp_path_factory):
    """40 labelled slices (plus 2 the labels file does not name) stored in the PACS, each patient
    a study with their real id and a made-up name, as a scanner would send them."""
    os.environ["NEUROCBIR_DICOMWEB_USER"], os.environ["NEUROCBIR_DICOMWEB_PASSWORD"] = USER, PASSWORD
    rng = np.random.default_rng(5)
    rows = rng.choice(len(small_cases), N_LABELLED + 2, replace=False)
    datasets, labels, by_uid, studies = [], ["sop_instance_uid,label,plane,area_mm2"], {}, {}
    for n, r in enumerate(rows):
        pid = str(small_cases.patient_id[r])
        study = studies.setdefault(pid, f"1.2.826.0.1.3680043.10.543.{len(studies) + 1}")
        sop = f"{study}.2.{n + 1}"
        ds = to_dicom(
            small_cases.load_image(int(r)), f"PAT-{pid}", study, f"{study}.1", sop, patient_name=f"Doe^Jane{n}"
        )
        datasets.append(ds)
        if n < N_LABELLED:
            labels.append(
                f"{sop},{int(small_cases.label[r]) + 1},{small_cases.plane[r]},{float(small_cases.area_mm2[r]):.2f}"
            )
            by_uid[sop] = int(r)
    client(orthanc).store_instances(datasets)
    out = tmp_path_factory.mktemp("pacs_labels") / "labels.csv"
    out.write_text("\n".join(labels) + "\n")
    return {"url": orthanc, "labels": out, "rows": by_uid, "datasets": datasets}


def _add(pacs, archive, run, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "neurocbir.cli",
        "add",
        "--dicomweb",
        pacs["url"],
        "--labels",
        str(pacs["labels"]),
        "--archive",
        str(archive),
        "--run",
        str(run),
        *extra,
    ]


@pytest.fixture(scope="module")
def pacs_archive(pacs, small_run, tmp_path_factory):
    archive = tmp_path_factory.mktemp("pacs_archive") / "archive"
    r = subprocess.run(_add(pacs, archive, small_run), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"{N_LABELLED} cases added, 0 already there" in r.stdout
    assert "2 instances on the server are not in" in r.stdout
    return archive


def test_dicomweb_ingest_is_faithful_and_deidentified(pacs, pacs_archive, small_run, small_cases):
    from neurocbir.models.inference import load_model

    arch = CaseArchive.open(pacs_archive, writer=False)
    ids, emb = arch.embeddings()
    assert len(ids) == N_LABELLED and arch.check()["states"] == {"indexed": N_LABELLED}
    # the embeddings are those of the original slices: the DICOM round trip lost no pixel
    model = load_model(small_run)
    stored = arch.cases(ids.tolist())
    by_key = {Path(c["image_path"]).stem: c for c in stored.values()}
    from neurocbir.retrieval.dicomweb import InstanceRef

    for uid, r in list(pacs["rows"].items())[:8]:
        case = by_key[InstanceRef("", "", uid).key]
        assert case["label"] == CLASS_NAMES[int(small_cases.label[r])]
        expected, _ = model.embed([small_cases.load_image(r)])
        assert np.allclose(emb[np.searchsorted(ids, case["case_id"])], expected[0], atol=1e-5)
        # the kept copy is the slice's pixels and nothing else
        assert np.array_equal(np.load(case["image_path"]), small_cases.load_image(r).astype(np.float32))
    arch.close()
    # no patient name, patient id or DICOM UID anywhere in the archive
    blob = b"".join(p.read_bytes() for p in pacs_archive.rglob("*") if p.is_file())
    for ds in pacs["datasets"][:N_LABELLED]:
        for value in (str(ds.PatientName), str(ds.PatientID), ds.SOPInstanceUID, ds.StudyInstanceUID):
            assert value.encode() not in blob, value
    with closing(sqlite3.connect(pacs_archive / "archive.db")) as db:
        n_patients = db.execute("SELECT COUNT(DISTINCT patient_key) FROM cases").fetchone()[0]
    assert n_patients == len({str(pacs["datasets"][i].PatientID) for i in range(N_LABELLED)})
    # a rerun downloads nothing: every instance is known by its UID's hash
    r = CliRunner().invoke(cli, _add(pacs, pacs_archive, small_run)[3:])  # in process, without `python -m`
    assert r.exit_code == 0, r.output
    assert f"0 cases added, {N_LABELLED} already there" in r.output


def test_dicomweb_ingest_resumes_after_sigkill(pacs, pacs_archive, small_run, tmp_path):
    archive = tmp_path / "archive"
    kills = 0
    for target in (6, 18):
        proc = subprocess.Popen(
            _add(pacs, archive, small_run, "--batch-size", "4"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        while proc.poll() is None and _count(archive) < target:
            time.sleep(0.02)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        arch = CaseArchive.open(archive)  # the writer repairs what the kill interrupted
        check = arch.check()
        assert check["duplicates"] == 0 and check["store_count"] == len(arch) < N_LABELLED
        arch.close()
    assert kills == 2
    done = subprocess.run(_add(pacs, archive, small_run), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "already there" in done.stdout and not done.stdout.startswith(f"{N_LABELLED} cases added")
    resumed, reference = CaseArchive.open(archive), CaseArchive.open(pacs_archive, writer=False)
    try:
        assert resumed.check()["states"] == {"indexed": N_LABELLED}
        keys = {r[0]: r[1] for r in resumed.db.execute("SELECT content_sha256, label FROM cases")}
        assert keys == {r[0]: r[1] for r in reference.db.execute("SELECT content_sha256, label FROM cases")}
    finally:
        resumed.close()
        reference.close()


def _count(archive: Path) -> int:
    try:
        with closing(sqlite3.connect(f"file:{archive / 'archive.db'}?mode=ro", uri=True, timeout=5)) as db:
            return db.execute("SELECT COUNT(*) FROM cases").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_dicomweb_query_by_instance_uid_cli_and_http(pacs, pacs_archive, small_run, small_cases, tmp_path):
    from neurocbir.app.api import create_app
    from neurocbir.serving.service import RetrievalService

    uid, row = next(iter(pacs["rows"].items()))
    # CLI: the scan straight from the PACS finds itself in the archive built from the PACS
    args = ["query", "--run", str(small_run), "--archive", str(pacs_archive), "--json"]
    r = CliRunner().invoke(cli, [*args, "--dicomweb", pacs["url"], "--instance", uid])
    assert r.exit_code == 0, r.output
    by_uid = json.loads(r.output)
    assert by_uid["retrievals"][0]["distance"] < 1e-3
    # ... and answers exactly as the same slice uploaded as a file
    path = tmp_path / "slice.dcm"
    pacs["datasets"][0].save_as(path, enforce_file_format=True)
    r = CliRunner().invoke(cli, [*args, str(path)])
    assert r.exit_code == 0, r.output
    by_file = json.loads(r.output)
    assert [x["case_id"] for x in by_uid["retrievals"]] == [x["case_id"] for x in by_file["retrievals"]]
    assert by_uid["prediction"] == by_file["prediction"]
    assert by_uid["query_tumor"] == by_file["query_tumor"]
    # HTTP: POST /query with instance_uid, the PACS image for the UI, the similarity map
    service = RetrievalService.from_archive(small_run, pacs_archive)
    http = TestClient(create_app(service, dicomweb=pacs["url"]))
    assert http.get("/health").json()["pacs"] is True
    q = http.post("/query", data={"instance_uid": uid})
    assert q.status_code == 200, q.text
    assert [x["case_id"] for x in q.json()["retrievals"]] == [x["case_id"] for x in by_uid["retrievals"]]
    png = http.get("/pacs/image.png", params={"instance_uid": uid})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == small_cases.load_image(row).shape[::-1]
    top = q.json()["retrievals"][0]["case_id"]
    heat = http.post(f"/similarity?case_id={top}", data={"instance_uid": uid})
    assert heat.status_code == 200 and heat.headers["content-type"] == "image/png"
    # clear errors: an unknown UID, a malformed one, two sources, a server with no PACS
    missing = http.post("/query", data={"instance_uid": "1.2.3.4.5.6.7"})
    assert missing.status_code == 404 and "no instance 1.2.3.4.5.6.7" in missing.json()["detail"]
    bad = http.post("/query", data={"instance_uid": "../../etc/passwd"})
    assert bad.status_code == 400 and "not a DICOM UID" in bad.json()["detail"]
    both = http.post("/query", data={"instance_uid": uid, "case_id": "1"})
    assert both.status_code == 422
    no_pacs = TestClient(create_app(service)).post("/query", data={"instance_uid": uid})
    assert no_pacs.status_code == 400 and "--dicomweb" in no_pacs.json()["detail"]


def test_dicomweb_errors_say_what_to_fix(pacs, small_run, tmp_path, monkeypatch):
    uid = next(iter(pacs["rows"]))
    closed = f"http://127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(PacsError, match="cannot reach the DICOMweb server"):
        read_instance(closed, uid)
    # wrong credentials: a fresh client reads them from the environment
    client.cache_clear()
    monkeypatch.setenv("NEUROCBIR_DICOMWEB_PASSWORD", "wrong")
    try:
        with pytest.raises(PacsError, match="refused access .*NEUROCBIR_DICOMWEB_USER"):
            read_instance(pacs["url"], uid)
    finally:
        client.cache_clear()
    monkeypatch.setenv("NEUROCBIR_DICOMWEB_PASSWORD", PASSWORD)
    runner = CliRunner()
    r = runner.invoke(
        cli, ["add", "--dicomweb", pacs["url"], "--archive", str(tmp_path / "a"), "--run", str(small_run)]
    )
    assert r.exit_code == 2 and "needs --labels" in r.output
    other = tmp_path / "labels.csv"
    other.write_text("sop_instance_uid,label\n1.2.3.999,glioma\n")
    r = runner.invoke(
        cli,
        [
            "add",
            "--dicomweb",
            pacs["url"],
            "--labels",
            str(other),
            "--archive",
            str(tmp_path / "a"),
            "--run",
            str(small_run),
        ],
    )
    assert r.exit_code == 2 and "none of the 1 instances" in r.output
    r = runner.invoke(cli, ["query", "--instance", uid, "--run", str(small_run)])
    assert r.exit_code == 2 and "--dicomweb" in r.output


def test_dicomweb_the_ui_opens_a_scan_by_instance_uid(pacs, pacs_archive, small_run):
    """In a real browser: the PACS field appears when the server has a PACS; a SOP Instance UID
    typed there is fetched, shown and answered like an upload."""
    from playwright.sync_api import expect, sync_playwright

    from neurocbir.app.api import create_app
    from neurocbir.serving.service import RetrievalService
    from tests.test_browser import ARTIFACTS, launch, serve_in_thread

    url, server = serve_in_thread(
        create_app(RetrievalService.from_archive(small_run, pacs_archive), dicomweb=pacs["url"])
    )
    uid = next(iter(pacs["rows"]))
    try:
        with sync_playwright() as p:
            browser = launch(p)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            expect(page.locator("#pacsRow")).to_be_visible()
            page.fill("#pacsUid", uid)
            page.click("#run")
            expect(page.locator(".retrieval")).to_have_count(5, timeout=30_000)
            expect(page.locator(".retrieval").first).to_contain_text("distance 0.000")  # the slice itself
            # the PACS image is shown (it loads beside the query, and may come after the answer)
            page.wait_for_function("() => document.querySelector('#queryImg').complete", timeout=30_000)
            assert page.locator("#queryImg").evaluate("i => i.naturalWidth") > 0
            page.wait_for_function("() => [...document.querySelectorAll('.retrieval img')].every(i => i.complete)")
            widths = page.locator(".retrieval img:not(.heat)").evaluate_all("l => l.map(i => i.naturalWidth)")
            assert widths and min(widths) > 0  # the archive's copies show, with no mask to outline
            if page.locator("#disagree").is_visible():  # says which disagreement it is
                vote = page.locator("#probs tr").evaluate_all("rows => rows.slice(1).map(r => r.cells[3].innerText)")
                top = ["meningioma", "glioma", "pituitary"][max(range(3), key=lambda i: float(vote[i].rstrip("%")))]
                pred = page.locator("#pred").inner_text().strip()
                text = page.locator("#disagree").inner_text()
                assert text.startswith("The neighbours disagree" if top != pred else "The evidence does not single out")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "browser_pacs.png"), full_page=True)
            page.fill("#pacsUid", "1.2.3.4.5.6.7")
            page.click("#run")
            expect(page.locator("#error")).to_contain_text("no instance 1.2.3.4.5.6.7")
            browser.close()
    finally:
        server.should_exit = True
