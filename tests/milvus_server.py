"""A real Milvus standalone server for the tests: the PyPI package `milvus` (embedded Milvus
2.3.5, with its own etcd), started on free ports with its data in a temporary folder, ready when
`list_collections` answers (its port opens well before that), stopped by SIGTERM and, after a wait,
SIGKILL (it takes more than 30 s to stop on SIGTERM). `kill()` and `start()` again simulate a crash."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PORT_OPTIONS = (
    "--proxy-port",
    "--etcd-port",
    "--root-coord-port",
    "--proxy-internal-port",
    "--query-coord-port",
    "--query-node-port",
    "--index-coord-port",
    "--index-node-port",
    "--data-coord-port",
    "--data-node-port",
)


#: ports the embedded server does not let us choose (its etcd's peer port, its management port):
#: one server at a time per machine
FIXED_PORTS = (2380, 9092)


def _wait_free(ports: tuple[int, ...], wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    for port in ports:
        while True:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1" if port == 2380 else "", port))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"port {port} stays in use: another Milvus server is running") from None
                    time.sleep(0.5)


def binary() -> str | None:
    """milvus-server beside this Python (the venv's bin), else on the PATH."""
    here = Path(sys.executable).parent / "milvus-server"
    return str(here) if here.is_file() else shutil.which("milvus-server")


def installed() -> bool:
    return binary() is not None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class MilvusServer:
    def __init__(self, data: Path):
        self.data = Path(data)
        self.ports = dict(zip(PORT_OPTIONS, _free_ports(len(PORT_OPTIONS))))
        self.uri = f"http://127.0.0.1:{self.ports['--proxy-port']}"
        self.proc: subprocess.Popen | None = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, wait_s: float = 240) -> MilvusServer:
        """Start and wait until it answers; a restart after a kill that never gets ready (it
        happens) is killed and started once more."""
        for attempt in (1, 2, 3):
            try:
                return self._start(45 if attempt < 3 else wait_s)  # a good start answers within seconds
            except RuntimeError:
                if attempt == 3:
                    raise
                self.kill()
        return self

    def _start(self, wait_s: float) -> MilvusServer:
        self.data.mkdir(parents=True, exist_ok=True)
        _wait_free(FIXED_PORTS, 90)  # a server stopped or killed just before may still hold them
        # a killed server's etcd lease outlives it by the session TTL (30 s by default) before a new
        # one may register: shorter here, so that the tests' restarts take seconds, not minutes
        args = [binary(), "--data", str(self.data), "--extra-config", "common.session.ttl=5"]
        for option, port in self.ports.items():
            args += [option, str(port)]
        self.log = open(self.data / "server.log", "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(wait_s)
        return self

    def wait_ready(self, wait_s: float) -> None:
        from pymilvus import MilvusClient

        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"milvus-server exited: {(self.data / 'server.log').read_text()[-2000:]}")
            try:
                client = MilvusClient(self.uri, timeout=3)
                client.list_collections()
                client.close()
                return
            except Exception:  # noqa: BLE001 - not ready yet, whatever pymilvus raises
                time.sleep(0.5)
        raise RuntimeError(f"milvus-server not ready after {wait_s} s")

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def _wait_group(self, wait_s: float) -> bool:
        deadline = time.monotonic() + wait_s
        while self._group_alive():
            self.proc.poll()  # reap the launcher
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def kill(self) -> None:
        """SIGKILL, as a crash: the whole process group (the launcher, the server, its etcd)."""
        if self.proc is not None and self._group_alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self._wait_group(30)
        self.log.close()

    def stop(self, wait_s: float = 45) -> None:
        """SIGTERM, then SIGKILL for what is left after ``wait_s`` (the server takes over 30 s)."""
        if self.proc is None:
            return
        if self._group_alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            if not self._wait_group(wait_s):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self._wait_group(30)
        self.log.close()
