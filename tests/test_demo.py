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
    proc, _, seconds = _start(tmp_path, env)
    out = _stop(proc)
    assert "training" not in out and seconds < 60


def test_demo_serves_the_committed_model_without_training(tmp_path, small_data_dir):
    """A fresh checkout holds models/lesion-fold5: the first start indexes the data with it
    (no training), /query answers with its tumor outline, and a second start reuses the index."""
    import json
    import shutil
    import uuid

    root = Path(__file__).resolve().parents[1]
    tracked = subprocess.run(["git", "ls-files", "models"], cwd=root, capture_output=True, text=True).stdout.split()
    assert any(p.endswith("checkpoint.pt") for p in tracked), "the committed model is not in git"
    for p in tracked:  # exactly what a clone gets
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / p, tmp_path / p)
    env = {**os.environ, "NEUROCBIR_DATA": str(small_data_dir), "PYTHONUNBUFFERED": "1"}
    proc, port, _ = _start(tmp_path, env)
    try:
        ex = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/examples").read())
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
    proc, _, _ = _start(tmp_path, env)
    out = _stop(proc)
    assert "indexing" not in out
