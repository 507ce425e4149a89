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
