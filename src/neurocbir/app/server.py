"""``neurocbir serve``: one service, its access control and audit trail, served by uvicorn (over
HTTPS with ``--tls-cert/--tls-key``). Safe by default: on an address other than the loopback, the
server refuses to start without users or an identity provider, unless ``--allow-anonymous``."""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neurocbir.errors import ConfigurationError


class UnsafeServe(ConfigurationError):
    """Serving to the network with nobody signing in, not asked for explicitly."""


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_role_claim: str = "roles"
    oidc_client_id: str | None = None
    allow_anonymous: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: reverse proxies (addresses or networks) whose X-Forwarded-For names the client
    trusted_proxies: list[str] = field(default_factory=list)
    audit_key: Path | None = None  # default: audit.key beside audit.db
    milvus_wait_s: float | None = None  # how long to wait for the archive's Milvus server at start
    workers: int = 1  # processes serving (each its own model and archive view)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: assume the network


def build_access(folder: Path, opts: ServeOptions):
    """The users beside the served run or archive, the identity provider, and (when either signs
    anyone in) the audit trail beside them."""
    from neurocbir.app.access import AccessControl
    from neurocbir.app.audit import AuditLog
    from neurocbir.app.shared_state import FILE as STATE_FILE
    from neurocbir.app.shared_state import SharedState
    from neurocbir.app.users import FILE, UserStore

    users = UserStore(folder / FILE) if (folder / FILE).is_file() else None
    # sessions, failed sign-ins and provider sign-ins in progress, shared by every worker process
    state = SharedState(folder / STATE_FILE) if users is not None or opts.oidc_issuer else SharedState()
    oidc = None
    if opts.oidc_issuer:
        from neurocbir.app.oidc import OIDC, OIDCSettings

        if not opts.oidc_audience:
            raise ConfigurationError("--oidc-issuer needs --oidc-audience (the audience the provider's tokens carry)")
        settings = OIDCSettings(opts.oidc_issuer, opts.oidc_audience, opts.oidc_role_claim, opts.oidc_client_id)
        oidc = OIDC(settings, state)
    for proxy in opts.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigurationError(
                f"--trusted-proxy {proxy!r} is not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/24)"
            ) from None
    control = AccessControl(users=users, oidc=oidc, state=state, trusted_proxies=list(opts.trusted_proxies))
    if control.enabled:
        control.audit = AuditLog.beside(folder, opts.audit_key)
    return control


def check_safe(control, opts: ServeOptions) -> None:
    if not is_loopback(opts.host) and not control.enabled and not opts.allow_anonymous:
        raise UnsafeServe(
            f"refusing to serve {opts.host} with nobody signing in: add users (`neurocbir users add NAME --role "
            "reader`), or give --oidc-issuer URL --oidc-audience AUD, or pass --allow-anonymous to open it to anyone "
            "who can reach it"
        )
    if (opts.tls_cert is None) != (opts.tls_key is None):
        raise ConfigurationError("--tls-cert and --tls-key go together")
    for f in (opts.tls_cert, opts.tls_key):
        if f is not None and not Path(f).is_file():
            raise FileNotFoundError(f"no such file: {f}")


def build_app(run: Path, archive: Path | None, dicomweb: str | None, opts: ServeOptions, say=print):
    """The app ``neurocbir serve`` runs (in each worker process, with several): access control,
    the LLM if one is configured, the service over the run or the archive; ``say`` tells the operator."""
    from neurocbir.app.api import create_app
    from neurocbir.reports.explain import Explainer
    from neurocbir.reports.llm import LLMUnavailable, llm_from_env
    from neurocbir.serving.service import RetrievalService

    folder = Path(archive) if archive is not None else Path(run)
    control = build_access(folder, opts)
    check_safe(control, opts)
    try:  # before anything loads: an LLM off this machine that the operator did not allow stops here
        llm = llm_from_env()
    except LLMUnavailable:
        llm = None
    began = time.perf_counter()
    service = (
        RetrievalService.from_archive(run, archive, store_wait_s=opts.milvus_wait_s)
        if archive is not None
        else RetrievalService.from_run(run)
    )
    loaded = time.perf_counter()
    # compile the CPU runtime now (about a second), so that the first clinician's scan does not wait for it
    service.model.embed([np.zeros((64, 64), np.float32)])
    parts = getattr(service.cases, "load_seconds", None) or {}
    say(
        f"neurocbir: loaded in {time.perf_counter() - began:.1f} s: the model and the cases {loaded - began:.1f} s"
        + (f" ({', '.join(f'{k} {v:.1f} s' for k, v in parts.items())})" if parts else "")
        + f", the CPU runtime compiled {time.perf_counter() - loaded:.1f} s"
    )
    if llm is not None:
        say("neurocbir: answers are phrased by the configured LLM and checked against the reports")
    if getattr(llm, "remote", False):
        say(
            f"neurocbir: report text is sent to the LLM at {llm.host}, off this machine "
            "(NEUROCBIR_LLM_ALLOW_REMOTE is set)"
        )
    scheme, where = ("https" if opts.tls_cert else "http"), f"{opts.host}:{opts.port}"
    say(
        f"neurocbir: serving run {run} (trial {service.trial}, {service.archive_size} archive cases) "
        f"at {scheme}://{where}/  (API docs: {scheme}://{where}/docs)"
        + (f" with {opts.workers} worker processes" if opts.workers > 1 else "")
    )
    say(f"neurocbir: sign-in: {control.mode}; audit trail: {control.audit.path if control.audit else 'off'}")
    if dicomweb:
        say(f"neurocbir: scans can be queried by SOP Instance UID from the PACS at {dicomweb}")
    if control.trusted_proxies:
        say(f"neurocbir: clients are named by X-Forwarded-For from {', '.join(control.trusted_proxies)} only")
    return create_app(service, Explainer(llm), dicomweb, control)  # it reads X-Forwarded-For itself


def _uvicorn_options(opts: ServeOptions) -> dict:
    tls = {"ssl_certfile": str(opts.tls_cert), "ssl_keyfile": str(opts.tls_key)} if opts.tls_cert else {}
    return {"log_level": "warning", "proxy_headers": False, **tls}


def serve(
    run: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    archive: Path | None = None,
    dicomweb: str | None = None,
    options: ServeOptions | None = None,
) -> None:
    import uvicorn

    opts = options or ServeOptions(host=host, port=port)
    opts.host, opts.port = host, port
    if opts.workers < 1:
        raise ConfigurationError("--workers must be at least 1")
    if opts.workers > 1:
        return serve_workers(run, archive, dicomweb, opts)
    app = build_app(run, archive, dicomweb, opts, say=lambda text: print(text, flush=True))
    uvicorn.run(app, host=host, port=port, **_uvicorn_options(opts))


def _worker(sock, run: Path, archive: Path | None, dicomweb: str | None, opts: ServeOptions, first: bool) -> None:
    """One worker process: its own model, archive view and app, on the socket the parent bound."""
    import uvicorn

    say = (lambda text: print(text, flush=True)) if first else (lambda text: None)
    app = build_app(run, archive, dicomweb, opts, say=say)
    uvicorn.Server(uvicorn.Config(app, **_uvicorn_options(opts))).run(sockets=[sock])


def serve_workers(run: Path, archive: Path | None, dicomweb: str | None, opts: ServeOptions) -> None:
    """``opts.workers`` processes on one listening socket (each with its own copy of the model and
    the archive's view); sessions, the sign-in throttle and the audit trail are shared through
    files beside the users (:mod:`neurocbir.app.shared_state`, :mod:`neurocbir.app.audit`)."""
    import multiprocessing
    import signal
    import socket

    folder = Path(archive) if archive is not None else Path(run)
    check_safe(build_access(folder, opts), opts)  # a refused setup stops here, said once
    family = socket.AF_INET6 if ":" in opts.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((opts.host, opts.port))
    sock.set_inheritable(True)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding threads
    procs = [
        ctx.Process(target=_worker, args=(sock, run, archive, dicomweb, opts, i == 0), daemon=False)
        for i in range(opts.workers)
    ]
    for p in procs:
        p.start()

    def stop(signum, frame):  # SIGTERM (a service manager stopping the server): stop the workers too
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(30)
        sock.close()
