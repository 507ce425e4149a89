"""The README's main command on a fresh checkout: `neurocbir demo` trains a quick run when
none exists, serves the app, and a second start reuses the run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cwd: Path, env: dict) -> tuple[subprocess.Popen, int, float]:
    port = _free_port()
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "neurocbir.cli", "demo", "--port", str(port)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    for _ in range(600):
        if proc.poll() is not None:
            raise AssertionError(f"demo exited early:\n{proc.stdout.read()}")
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
                return proc, port, time.time() - t0
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("demo did not come up")


def _stop(proc: subprocess.Popen) -> str:
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return out


def test_demo_trains_once_then_reuses(tmp_path, small_data_dir, feature_cache):
    env = {
        **os.environ,
        "NEUROCBIR_DATA": str(small_data_dir),
        "NEUROCBIR_CACHE": str(feature_cache),
        "PYTHONUNBUFFERED": "1",
    }
    proc, port, _ = _start(tmp_path, env)
    html = urllib.request.urlopen(f"http://127.0.0.1:{port}/").read().decode()
    out = _stop(proc)
    assert "not a diagnosis" in html or "Decision support" in html
    assert "training a quick SupCon model" in out and f"http://127.0.0.1:{port}/" in out
    assert (tmp_path / "runs" / "demo" / "trial_0" / "index.faiss").is_file()
    proc, _, _ = _start(tmp_path, env)
    out = _stop(proc)
    assert "training" not in out  # the run is reused, not trained again


def _clone_models(dest: Path) -> None:
    """The committed models, exactly as a clone gets them (no archive index yet)."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    tracked = subprocess.run(["git", "ls-files", "models"], cwd=root, capture_output=True, text=True).stdout.split()
    assert any(p.endswith("checkpoint.pt") for p in tracked), "the committed model is not in git"
    for p in tracked:
        (dest / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / p, dest / p)


def test_committed_model_named_by_run_is_indexed_on_first_use(tmp_path, small_data_dir, small_cases):
    """`neurocbir query --run models/lesion-fold5` on a fresh clone answers (indexing first), and a
    run with weights but no index is told to index, not to train over its weights."""
    import json

    _clone_models(tmp_path)
    env = {**os.environ, "NEUROCBIR_DATA": str(small_data_dir), "PYTHONUNBUFFERED": "1"}
    weights = tmp_path / "elsewhere"
    for p in (tmp_path / "models" / "lesion-fold5").rglob("*"):
        if p.is_file():
            (weights / p.relative_to(tmp_path / "models" / "lesion-fold5")).parent.mkdir(parents=True, exist_ok=True)
            (weights / p.relative_to(tmp_path / "models" / "lesion-fold5")).write_bytes(p.read_bytes())
    image = small_data_dir / "images" / f"{int(small_cases.idx[0])}.jpg"
    cli = [sys.executable, "-m", "neurocbir.cli", "query", str(image), "--json", "--run"]
    other = subprocess.run([*cli, str(weights)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert other.returncode != 0 and f"neurocbir index {weights}" in other.stderr + other.stdout
    assert "Traceback" not in other.stderr
    res = subprocess.run([*cli, "models/lesion-fold5"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "First start: indexing" in res.stdout + res.stderr
    answer = json.loads(res.stdout[res.stdout.index("{") :])
    assert answer["prediction"] in ("meningioma", "glioma", "pituitary") and answer["query_tumor"] is not None
    assert (tmp_path / "models" / "lesion-fold5" / "trial_0" / "index.faiss").is_file()


def _small_external(dest: Path, per_kind: int = 40) -> Path:
    """Other hospitals' slices, the first ``per_kind`` with and without a tumor, in their layout."""
    import csv
    import shutil

    src = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain-tumor-external-v2"
    with open(src / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    keep = [r for r in rows if r["label_name"] == "notumor"][:per_kind] + [
        r for r in rows if r["label_name"] != "notumor"
    ][:per_kind]
    (dest / "images").mkdir(parents=True)
    with open(dest / "metadata.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image_file", "label_name", "group", "source", "patient", "slice"])
        w.writeheader()
        for r in keep:
            shutil.copy(src / r["image_file"], dest / r["image_file"])
            w.writerow({k: r[k] for k in w.fieldnames})
    return dest


def test_demo_serves_the_committed_model_without_training(tmp_path, small_data_dir):
    """A fresh checkout holds models/lesion-fold5: the first start builds the demo archive with it
    (no training) from the dataset and other hospitals' slices, its examples include slices with
    no tumor, /query answers with the tumor outline, and a second start reuses the archive."""
    import json
    import uuid

    _clone_models(tmp_path)
    external = _small_external(tmp_path / "external")
    env = {
        **os.environ,
        "NEUROCBIR_DATA": str(small_data_dir),
        "NEUROCBIR_EXTERNAL": str(external),
        "PYTHONUNBUFFERED": "1",
    }
    proc, port, _ = _start(tmp_path, env)
    try:
        ex = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/examples").read())
        assert {"meningioma", "glioma", "pituitary", "notumor"} == {e["label"] for e in ex["examples"]}
        case = ex["examples"][0]["case_id"]
        boundary = uuid.uuid4().hex
        body = f'--{boundary}\r\nContent-Disposition: form-data; name="case_id"\r\n\r\n{case}\r\n--{boundary}--\r\n'
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/query",
            data=body.encode(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        answer = json.loads(urllib.request.urlopen(req).read())
    finally:
        out = _stop(proc)
    assert "First start: indexing" in out and "training" not in out
    assert answer["query_tumor"] is not None and answer["query_tumor"]["area_mm2"] > 0
    assert answer["tumor_found"] is True and answer["prediction"] in ("meningioma", "glioma", "pituitary")
    assert "other hospitals' slices: the development part" in out
    proc, _, _ = _start(tmp_path, env)
    out = _stop(proc)
    assert "indexing" not in out
