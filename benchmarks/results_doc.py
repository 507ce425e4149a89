"""Helpers shared by the benchmark scripts: machine description and atomic rewrite of one
generated section of docs/results.md (the rest of the document is left as it is)."""

from __future__ import annotations

import contextlib
import os
import platform
import re
from pathlib import Path

from neurocbir import files

DOC = Path(__file__).resolve().parents[1] / "docs" / "results.md"


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    try:
        import torch

        tv = f", torch {torch.__version__}"
    except ImportError:
        tv = ""
    load = os.getloadavg()[0]  # another job on the same cores slows what is measured: say so
    busy = f"; load average {load:.1f} when it started" + (" (other work running)" if load > 0.5 else "")
    return f"{os.cpu_count()} cores ({cpu}), {platform.system()}, Python {platform.python_version()}{tv}{busy}"


def serve_in_thread(app) -> tuple[str, object]:
    """(base URL, uvicorn server) of ``app`` served on a free loopback port in a daemon thread,
    once it accepts requests; set ``server.should_exit`` to stop it."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def read_section(name: str, doc: Path = DOC) -> str | None:
    """The body of a generated section as the document holds it now (None when absent)."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    found = re.search(re.escape(begin) + r"\n(.*?)\n" + re.escape(end), doc.read_text() if doc.is_file() else "", re.S)
    return found.group(1) if found else None


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = (
        doc.read_text()
        if doc.is_file()
        else "# neurocbir results\n\nEvery figure below is written by the script named in its section; do not edit them by hand.\n"
    )
    section = f"{begin}\n{body}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    files.write_text(doc, text)
