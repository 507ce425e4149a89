"""``neurocbir serve``: one service, its access control and audit trail, served by uvicorn (over
HTTPS with ``--tls-cert/--tls-key``). Safe by default: on an address other than the loopback, the
server refuses to start without users or an identity provider, unless ``--allow-anonymous``."""

from __future__ import annotations

import ipaddress
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
    from neurocbir.app.users import FILE, UserStore

    users = UserStore(folder / FILE) if (folder / FILE).is_file() else None
    oidc = None
    if opts.oidc_issuer:
        from neurocbir.app.oidc import OIDC, OIDCSettings

        if not opts.oidc_audience:
            raise ConfigurationError("--oidc-issuer needs --oidc-audience (the audience the provider's tokens carry)")
        oidc = OIDC(OIDCSettings(opts.oidc_issuer, opts.oidc_audience, opts.oidc_role_claim, opts.oidc_client_id))
    for proxy in opts.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigurationError(
                f"--trusted-proxy {proxy!r} is not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/24)"
            ) from None
    control = AccessControl(users=users, oidc=oidc, trusted_proxies=list(opts.trusted_proxies))
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


def serve(
    run: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    archive: Path | None = None,
    dicomweb: str | None = None,
    options: ServeOptions | None = None,
) -> None:
    import uvicorn

    from neurocbir.app.api import create_app
    from neurocbir.reports.explain import Explainer
    from neurocbir.reports.llm import LLMUnavailable, llm_from_env
    from neurocbir.serving.service import RetrievalService

    opts = options or ServeOptions(host=host, port=port)
    opts.host, opts.port = host, port
    folder = Path(archive) if archive is not None else Path(run)
    control = build_access(folder, opts)
    check_safe(control, opts)
    try:  # before anything loads: an LLM off this machine that the operator did not allow stops here
        llm = llm_from_env()
    except LLMUnavailable:
        llm = None
    service = (
        RetrievalService.from_archive(run, archive, store_wait_s=opts.milvus_wait_s)
        if archive is not None
        else RetrievalService.from_run(run)
    )
    # compile the CPU runtime now (about a second), so that the first clinician's scan does not wait for it
    service.model.embed([np.zeros((64, 64), np.float32)])
    explainer = Explainer(llm)
    if llm is not None:
        print("neurocbir: answers are phrased by the configured LLM and checked against the reports", flush=True)
    if getattr(llm, "remote", False):
        print(
            f"neurocbir: report text is sent to the LLM at {llm.host}, off this machine "
            "(NEUROCBIR_LLM_ALLOW_REMOTE is set)",
            flush=True,
        )
    scheme = "https" if opts.tls_cert else "http"
    print(
        f"neurocbir: serving run {run} (trial {service.trial}, {service.archive_size} archive cases) "
        f"at {scheme}://{host}:{port}/  (API docs: {scheme}://{host}:{port}/docs)",
        flush=True,
    )
    print(
        f"neurocbir: sign-in: {control.mode}; audit trail: {control.audit.path if control.audit else 'off'}", flush=True
    )
    if dicomweb:
        print(f"neurocbir: scans can be queried by SOP Instance UID from the PACS at {dicomweb}", flush=True)
    tls = {"ssl_certfile": str(opts.tls_cert), "ssl_keyfile": str(opts.tls_key)} if opts.tls_cert else {}
    if control.trusted_proxies:
        print(
            f"neurocbir: clients are named by X-Forwarded-For from {', '.join(control.trusted_proxies)} only",
            flush=True,
        )
    app = create_app(
        service, explainer, dicomweb, control
    )  # it reads X-Forwarded-For itself, from trusted proxies only
    uvicorn.run(app, host=host, port=port, log_level="warning", proxy_headers=False, **tls)
