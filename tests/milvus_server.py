"""A real Milvus standalone server for the tests: the PyPI package `milvus` (embedded Milvus
2.3.5, with its own etcd), started on free ports with its data in a temporary folder, ready when
`list_collections` answers (its port opens well before that), stopped by SIGTERM and, after a wait,
SIGKILL (it takes more than 30 s to stop on SIGTERM). `kill()` and `start()` again simulate a crash.

Its embedded etcd would listen on etcd's default ports (2379, 2380) whatever `--etcd-port` says:
an etcd configuration file (named by ETCD_CONFIG_PATH, which Milvus reads as `etcd.config.path`)
moves them to free ports too, so that a server left running elsewhere on the machine (another
checkout's tests, a benchmark) does not stop this one from starting."""

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


def _wait_free(ports: tuple[int, ...], wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    for port in ports:
        while True:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"port {port} stays in use") from None
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
    def __init__(self, data: Path, session_ttl_s: int = 5):
        """``session_ttl_s``: 5 s suits the tests' kills and restarts; a benchmark that writes
        gigabytes beside the server passes more (a disk stall longer than the TTL expires the
        server's own etcd session, and the server then stops itself)."""
        self.data = Path(data)
        self.session_ttl_s = int(session_ttl_s)
        *ports, self.etcd_peer_port = _free_ports(len(PORT_OPTIONS) + 1)
        self.ports = dict(zip(PORT_OPTIONS, ports))
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
        # this server's own etcd, killed just before, may hold its ports a moment longer
        _wait_free((self.ports["--etcd-port"], self.etcd_peer_port), 90)
        etcd = self._write_etcd_config()
        # a killed server's etcd lease outlives it by the session TTL (30 s by default) before a new
        # one may register: shorter here, so that the tests' restarts take seconds, not minutes
        args = [binary(), "--data", str(self.data), "--extra-config", f"common.session.ttl={self.session_ttl_s}"]
        for option, port in self.ports.items():
            args += [option, str(port)]
        self.log = open(self.data / "server.log", "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "ETCD_CONFIG_PATH": str(etcd)},
        )
        self.wait_ready(wait_s)
        return self

    def _write_etcd_config(self) -> Path:
        client = f"http://127.0.0.1:{self.ports['--etcd-port']}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        path = self.data / "etcd.yaml"
        path.write_text(
            f"name: default\nlisten-client-urls: {client}\nadvertise-client-urls: {client}\n"
            f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\ninitial-cluster: default={peer}\n"
        )
        return path

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
