"""HTTP API (FastAPI, OpenAPI at /docs) and the web UI, over one RetrievalService.

Routers by concern (pages, queries, reports, cases); the service and the explainer are
injected from ``app.state`` so one app serves whatever source the service was built on."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import uuid
from importlib import resources
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field
from starlette.routing import Mount
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from neurocbir.app.access import AccessControl, AccessMiddleware, note, principal
from neurocbir.app.auth_api import router as auth_router
from neurocbir.app.images import png as _png
from neurocbir.app.region_form import region_of
from neurocbir.app.study_api import router as study_router
from neurocbir.data.regions import Region
from neurocbir.data.uploads import MAX_UPLOAD_BYTES, read_scan_with_spacing
from neurocbir.errors import NeurocbirError
from neurocbir.reports.explain import NO_REPORTS, PAPER_QUESTIONS, Answer, Explainer, left_out
from neurocbir.reports.text import STYLES
from neurocbir.serving.service import DISCLAIMER, RetrievalService
from neurocbir.serving.sources import CaseFilter

log = logging.getLogger("neurocbir.app.api")
LLM_TIMEOUT_S = 60.0
DOCS_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>neurocbir API</title>
<link rel="stylesheet" href="/static-offline-docs/swagger-ui.css"></head>
<body><div id="swagger-ui"></div><script src="/static-offline-docs/swagger-ui-bundle.js"></script>
<script src="/static/docs.js"></script></body></html>"""


class CasesRequest(BaseModel):
    case_ids: list[int] = Field(..., min_length=1, max_length=50, description="retrieved case ids, in retrieval order")
    query_case_id: int | None = Field(None, description="an archive/example case used as the query, if any")
    query_report: str | None = Field(None, max_length=5000, description="the query scan's report, if known")
    query_tumor_area_mm2: float | None = Field(
        None, ge=0, le=100000, description="the query's tumor area estimated by /query (query_tumor), if no report"
    )
    style: str = Field("normal", description="report style: plain | normal | alternative")


class FeedbackRequest(BaseModel):
    query_fingerprint: str = Field(..., min_length=32, max_length=32, description="as returned by /query")
    case_id: int = Field(..., description="the retrieved case being rated")
    relevant: bool = Field(..., description="clinically relevant to the query?")


class AskRequest(CasesRequest):
    question: str = Field(..., min_length=1, max_length=1000)


def _keep_uploads_in_memory() -> None:
    """Starlette spools multipart files over 1 MB to the system temp dir; keep uploads (capped
    at MAX_UPLOAD_BYTES by the middleware below) in memory so nothing is written to disk."""
    from starlette.formparsers import MultiPartParser

    MultiPartParser.spool_max_size = MAX_UPLOAD_BYTES + 1024 * 1024


def _service(request: Request) -> RetrievalService:
    return request.app.state.service


def _explainer(request: Request) -> Explainer:
    return request.app.state.explainer


Service = Annotated[RetrievalService, Depends(_service)]
Explaining = Annotated[Explainer, Depends(_explainer)]


def _not_found(exc: KeyError) -> HTTPException:
    return HTTPException(404, str(exc.args[0]))


def _pacs(request: Request) -> str | None:
    return request.app.state.dicomweb


Pacs = Annotated[str | None, Depends(_pacs)]


async def _scan(
    service: RetrievalService, pacs: str | None, file: UploadFile | None, case_id: int | None, instance_uid: str | None
) -> tuple[np.ndarray, tuple[float, float] | None]:
    """The query scan and its pixel spacing: an upload, an example case, or a PACS instance."""
    from neurocbir.retrieval.dicomweb import read_instance

    if sum(x is not None for x in (file, case_id, instance_uid)) != 1:
        raise HTTPException(
            422, "send the scan as the multipart field 'file', or an example 'case_id', or a PACS 'instance_uid'"
        )
    try:
        if file is not None:
            return await run_in_threadpool(
                read_scan_with_spacing, await file.read(MAX_UPLOAD_BYTES + 1), file.filename or ""
            )
        if instance_uid is not None:
            if pacs is None:
                raise HTTPException(400, "this server has no PACS: start it with `neurocbir serve --dicomweb URL`")
            return await run_in_threadpool(read_instance, pacs, instance_uid)
        return await run_in_threadpool(service.cases.image, case_id), None
    except KeyError as exc:
        raise _not_found(exc) from None


REGION_HELP = "search by this region of the scan: a box x0,y0,x1,y1 in the scan's pixels"
REGION_MASK_HELP = "search by this region of the scan: a binary mask image (PNG) the size of the scan"


def _audited_fingerprint(fingerprint: str, region: Region | None) -> str:
    """The query's fingerprint in the audit trail, with the region it searched by (no pixels)."""
    return fingerprint if region is None else f"{fingerprint} region {region.describe()}"


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise HTTPException(422, f"style must be one of {', '.join(STYLES)}")


queries = APIRouter(tags=["query"])
reports = APIRouter(tags=["reports"])
cases = APIRouter(tags=["cases"])
pages = APIRouter()


@pages.get("/health")
def health(service: Service, pacs: Pacs) -> JSONResponse:
    """200 while queries can be answered; 503, with the reason, while the served archive's
    latest state cannot be (e.g. every case removed), so that a load balancer notices."""
    size, problem = service.archive_size, service.archive_problem
    body = {
        "status": "ok" if problem is None else "archive unavailable",
        "archive_cases": size,
        "archive_problem": problem,
        "run": service.run.name,
        "trial": service.trial,
        "pacs": pacs is not None,
        "worker": os.getpid(),  # which worker process answered (serve --workers N)
    }
    return JSONResponse(body, status_code=200 if problem is None else 503)


@pages.get("/docs", response_class=HTMLResponse, include_in_schema=False)
def docs() -> str:
    """Swagger UI from this server's own files, started by /static/docs.js (no inline script)."""
    return DOCS_PAGE


@pages.get("/", response_class=HTMLResponse)
def index() -> str:
    return resources.files("neurocbir.app").joinpath("static/index.html").read_text()


@queries.post("/query")
async def query(
    request: Request,
    service: Service,
    pacs: Pacs,
    file: UploadFile | None = File(None),
    case_id: int | None = Form(None),
    instance_uid: str | None = Form(None, description="SOP Instance UID of a scan on the server's PACS"),
    k: int = Query(5, ge=1, le=50),
    one_per_patient: bool = Query(False),
    coverage: float = Query(0.95, ge=0.5, lt=1, description="coverage of the conformal prediction set"),
    rerank: bool = Query(False, description="order the shown retrievals by clinicians' feedback"),
    plane: str | None = Query(None, description="show only archive cases in this plane (axial, coronal, sagittal)"),
    tumor_type: str | None = Query(None, description="show only archive cases of this tumor type"),
    min_area_mm2: float | None = Query(None, ge=0, description="show only tumors at least this large"),
    max_area_mm2: float | None = Query(None, ge=0, description="show only tumors at most this large"),
    region: str | None = Form(None, description=REGION_HELP),
    region_mask: UploadFile | None = File(None, description=REGION_MASK_HELP),
) -> dict:
    """Similar archive cases, the prediction from them and its evidence, for one scan (or for a
    region drawn on it: ``region`` or ``region_mask``)."""
    if len((await request.form()).getlist("file")) > 1:  # two parts may come: a scan and a region mask
        raise HTTPException(400, "one scan per query: send one 'file' (a whole series: POST /query/study with files)")
    filters = CaseFilter(plane or None, tumor_type or None, min_area_mm2, max_area_mm2)
    image, spacing = await _scan(service, pacs, file, case_id, instance_uid)
    drawn = await region_of(image, region, region_mask)
    # off the event loop: /health and static files stay responsive under load
    out = await run_in_threadpool(
        service.query,
        image,
        k=k,
        one_per_patient=one_per_patient,
        coverage=coverage,
        pixel_spacing_mm=spacing,
        rerank=rerank,
        filters=filters,
        region=drawn,
    )
    other = [out["nearest_other_class"]["case_id"]] if out.get("nearest_other_class") else []
    shown = [r["case_id"] for r in out["retrievals"]] + other + ([case_id] if case_id is not None else [])
    note(request, shown, _audited_fingerprint(out["query_fingerprint"], drawn))
    return JSONResponse(out)  # plain JSON types already: no second walk through FastAPI's encoder


@queries.post("/similarity", response_class=Response)
async def similarity(
    request: Request,
    service: Service,
    pacs: Pacs,
    case_id: int = Query(..., description="the archive case the query is compared with"),
    side: str = Query("query", description="query: map over the query scan; case: over the archive case"),
    file: UploadFile | None = File(None),
    query_case_id: int | None = Form(None),
    instance_uid: str | None = Form(None, description="the query as a SOP Instance UID on the server's PACS"),
    region: str | None = Form(None, description=REGION_HELP + " (the query was searched by it)"),
    region_mask: UploadFile | None = File(None, description=REGION_MASK_HELP + " (the query was searched by it)"),
) -> Response:
    """Why is this case similar? An RGBA PNG heat map at the mapped image's own pixel size, to
    lay over it (hot = the regions that bring the two scans' embeddings together). For a lesion
    model, the header ``X-Lesion-Share`` says how much of the similarity comes from the
    tumor-weighted half of the embedding (the rest: the whole slice), or, for a query searched by
    a drawn region, from the region's half."""
    from neurocbir.models.saliency import heat_png

    note(request, [case_id] + ([query_case_id] if query_case_id is not None else []))
    image, _ = await _scan(service, pacs, file, query_case_id, instance_uid)
    drawn = await region_of(image, region, region_mask)
    if drawn is not None:
        note(request, fingerprint=f"region {drawn.describe()}")
    try:
        sal, share = await run_in_threadpool(service.similarity, image, case_id, side, drawn)
    except KeyError as exc:
        raise _not_found(exc) from None
    headers = {"X-Lesion-Share": f"{share:.3f}"} if share is not None else {}
    return Response(heat_png(sal), media_type="image/png", headers=headers)


@queries.get("/pacs/image.png")
async def pacs_image(
    request: Request,
    service: Service,
    pacs: Pacs,
    instance_uid: str = Query(..., description="SOP Instance UID on the server's PACS"),
) -> Response:
    """A PACS instance as a PNG at its own pixel size, to show the query the UI fetched by UID."""
    note(request, fingerprint="uid:" + hashlib.sha256(instance_uid.encode()).hexdigest()[:32])
    image, _ = await _scan(service, pacs, None, None, instance_uid)
    return Response(_png(image, None, size=max(image.shape)), media_type="image/png")


@queries.post("/feedback")
def feedback(req: FeedbackRequest, request: Request, service: Service) -> dict:
    """A clinician's relevant / not relevant mark on a retrieval, stored durably (SQLite), under
    the signed-in user's name."""
    note(request, [req.case_id], req.query_fingerprint)
    try:
        service.cases.describe([req.case_id])
        mark = service.feedback.add(req.query_fingerprint, req.case_id, req.relevant, principal(request).name)
    except KeyError as exc:
        raise _not_found(exc) from None
    return {"id": mark, "stored": True}


@queries.get("/feedback.csv", response_class=Response)
def feedback_csv(service: Service) -> Response:
    """Every mark so far (time, query fingerprint, case, relevant), as CSV."""
    return Response(
        service.feedback.export_csv(),
        media_type="text/csv",
        headers={"Content-Disposition": 'attachment; filename="feedback.csv"'},
    )


def _case_reports(service: RetrievalService, req: CasesRequest) -> tuple[list[int], list[str], str | None, list[int]]:
    """(the ranks of the retrieved cases with a report, their reports, the query's report, the
    ranks of those without one: a case of another hospital may come with neither a report nor
    the plane and size to write one from)."""
    _check_style(req.style)
    try:
        found = service.cases.reports(req.case_ids, req.style)
        query = req.query_report
        if query is None and req.query_case_id is not None:
            query = service.cases.reports([req.query_case_id], req.style)[0]
    except KeyError as exc:
        raise _not_found(exc) from None
    numbers = [n for n, text in enumerate(found, start=1) if text is not None]
    without = [n for n, text in enumerate(found, start=1) if text is None]
    return numbers, [found[n - 1] for n in numbers], query, without


async def _explain(explainer: Explainer, method: str, *args) -> tuple[object, bool]:
    """Run ``explainer.<method>`` off the event loop; an LLM that takes longer than
    :data:`LLM_TIMEOUT_S` is not waited for: the grounded engine answers instead (flagged)."""
    if explainer.llm is None:
        return getattr(explainer, method)(*args), False
    try:
        return await asyncio.wait_for(run_in_threadpool(getattr(explainer, method), *args), LLM_TIMEOUT_S), False
    except TimeoutError:
        log.warning("the LLM took longer than %s s; answering from the grounded engine", LLM_TIMEOUT_S)
        return getattr(Explainer(), method)(*args), True


@reports.post("/summary")
async def summary(req: CasesRequest, request: Request, service: Service, explainer: Explaining) -> dict:
    note(request, req.case_ids + ([req.query_case_id] if req.query_case_id is not None else []))
    numbers, texts, query, without = _case_reports(service, req)
    if not texts:
        return {"summary": NO_REPORTS, "facts": None, "source": "none", "reports": [], "without_report": without}
    area = None if query else req.query_tumor_area_mm2
    out, timed_out = await _explain(explainer, "summarize", texts, query, area, numbers)
    source = "grounded (the LLM timed out)" if timed_out else out["source"]
    text = out["summary"] + (f" {left_out(without)}" if without else "")
    return {"summary": text, "facts": out["facts"], "source": source, "reports": texts, "without_report": without}


@reports.post("/ask")
async def ask(req: AskRequest, request: Request, service: Service, explainer: Explaining) -> dict:
    note(request, req.case_ids + ([req.query_case_id] if req.query_case_id is not None else []))
    numbers, texts, query, without = _case_reports(service, req)
    if not texts:
        return {**Answer(NO_REPORTS).as_dict(), "corrected": False, "llm_timed_out": False, "without_report": without}
    area = None if query else req.query_tumor_area_mm2
    (ans, _), timed_out = await _explain(explainer, "answer", req.question, texts, query, area, numbers)
    text = ans.answer + (f" {left_out(without)}" if without else "")
    return {
        **ans.as_dict(),
        "answer": text,
        "corrected": ans.corrected,
        "llm_timed_out": timed_out,
        "without_report": without,
    }


@cases.get("/cases/{case_id}")
def case(case_id: int, request: Request, service: Service, style: str = "normal") -> dict:
    note(request, [case_id])
    _check_style(style)
    try:
        out = service.cases.case(case_id, style)
    except KeyError as exc:
        raise _not_found(exc) from None
    return {**out, "image_url": f"/cases/{case_id}/image.png", "mask_url": f"/cases/{case_id}/mask.png"}


@cases.get("/cases/{case_id}/image.png")
def case_image(
    case_id: int, request: Request, service: Service, outline: bool = False, size: int = Query(256, ge=32, le=512)
) -> Response:
    note(request, [case_id])
    try:
        img = service.cases.image(case_id)
    except KeyError as exc:
        raise _not_found(exc) from None
    mask = None
    if outline:
        with contextlib.suppress(KeyError):  # no mask for this case (e.g. ingested from a PACS): no outline
            mask = service.cases.mask(case_id)
    return Response(_png(img, mask, size), media_type="image/png")


@cases.get("/cases/{case_id}/mask.png")
def case_mask(case_id: int, request: Request, service: Service) -> Response:
    note(request, [case_id])
    try:
        mask = service.cases.mask(case_id)
    except KeyError as exc:
        raise _not_found(exc) from None
    return Response(_png(mask.astype(np.float32), None, 512), media_type="image/png")


@cases.get("/examples")
def examples(request: Request, service: Service) -> dict:
    listed = service.cases.examples()
    note(request, [e["case_id"] for e in listed])
    return {"examples": listed, "questions": list(PAPER_QUESTIONS), "disclaimer": DISCLAIMER}


async def _user_error(request: Request, exc: NeurocbirError) -> JSONResponse:
    """Bad input, a missing resource, a service unavailable: its status and its message for the user."""
    headers = {"Retry-After": "5"} if exc.status == 503 else None
    return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug: a 500 that carries a request id and nothing else; the traceback goes to the server log."""
    request_id = uuid.uuid4().hex[:16]
    log.error("internal error, request id %s, %s %s", request_id, request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        {"detail": f"internal error (request id {request_id}); the server keeps running", "request_id": request_id},
        status_code=500,
        headers={"X-Request-ID": request_id},
    )


def create_app(
    service: RetrievalService,
    explainer: Explainer | None = None,
    dicomweb: str | None = None,
    access: AccessControl | None = None,
) -> FastAPI:
    """The API and UI over one service (grounded answers unless an LLM explainer is given);
    ``dicomweb``: a PACS whose instances can be queried by SOP Instance UID; ``access``: users,
    identity provider and audit trail (default: none, the loopback's anonymous use)."""
    # the API docs (/docs) with their scripts served from here: they work with no internet, and a
    # browser on a hospital network contacts no outside host (no ReDoc: it fetches a logo from its CDN)
    app = FastAPIOffline(
        docs_url=None,  # our own /docs page: Swagger UI started by a script file, not inline script
        redoc_url=None,
        title="neurocbir",
        version="0.1.0",
        description="Retrieval-based brain tumor MRI decision support. " + DISCLAIMER,
        # body bytes are counted as they arrive (chunked bodies too); a query takes a scan and a region mask
        max_body_size=MAX_UPLOAD_BYTES + 64 * 1024,
        form_limits={"max_files": 2, "max_fields": 8},
    )
    app.state.service, app.state.explainer, app.state.dicomweb = service, explainer or Explainer(), dicomweb
    app.state.access = access or AccessControl()
    _keep_uploads_in_memory()
    routers = (pages, queries, study_router, reports, cases, auth_router)
    for router in routers:
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=str(resources.files("neurocbir.app").joinpath("static"))), name="static")
    # every route and mount, flat: what access control matches a request against (and tests read)
    app.state.route_table = [r for router in routers for r in router.routes] + [
        r for r in app.router.routes if isinstance(r, Mount)
    ]
    app.add_exception_handler(NeurocbirError, _user_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(AccessMiddleware, control=app.state.access, routes_of=lambda: app.state.route_table)
    if app.state.access.trusted_proxies:  # the client as the operator's reverse proxy names it
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=app.state.access.trusted_proxies)
    return app
