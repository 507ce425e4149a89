"""HTTP API (FastAPI, OpenAPI at /docs) and the web UI, over one RetrievalService."""

from __future__ import annotations

import io
import logging
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi.concurrency import run_in_threadpool
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from .explain import PAPER_QUESTIONS, Explainer
from .reports import STYLES, ReportParseError
from .service import DISCLAIMER, RetrievalService
from .uploads import MAX_UPLOAD_BYTES, UploadError, read_scan

log = logging.getLogger("neurocbir.app")


class CasesRequest(BaseModel):
    case_ids: list[int] = Field(..., min_length=1, max_length=50, description="retrieved case ids, in retrieval order")
    query_case_id: int | None = Field(None, description="an archive/example case used as the query, if any")
    query_report: str | None = Field(None, max_length=5000, description="the query scan's report, if known")
    style: str = Field("normal", description="report style: plain | normal | alternative")


class AskRequest(CasesRequest):
    question: str = Field(..., min_length=1, max_length=1000)


def _png(img: np.ndarray, mask: np.ndarray | None = None, size: int = 256) -> bytes:
    from PIL import Image
    from scipy.ndimage import binary_erosion

    a = img.astype(np.float32)
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6) * 255
    rgb = np.repeat(a.astype(np.uint8)[..., None], 3, axis=2)
    if mask is not None and mask.shape == img.shape:
        edge = mask & ~binary_erosion(mask, iterations=3)
        rgb[edge] = (255, 40, 40)
    buf = io.BytesIO()
    Image.fromarray(rgb).resize((size, size)).save(buf, format="PNG")
    return buf.getvalue()


def _keep_uploads_in_memory() -> None:
    """Starlette spools multipart files over 1 MB to the system temp dir; keep uploads (capped
    at MAX_UPLOAD_BYTES by the middleware below) in memory so nothing is written to disk."""
    from starlette.formparsers import MultiPartParser

    MultiPartParser.spool_max_size = MAX_UPLOAD_BYTES + 1024 * 1024


def create_app(service: RetrievalService, explainer: Explainer | None = None) -> FastAPI:
    app = FastAPI(title="neurocbir", version="0.1.0",
                  description="Retrieval-based brain tumor MRI decision support. " + DISCLAIMER)
    explainer = explainer or Explainer()
    _keep_uploads_in_memory()

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_UPLOAD_BYTES + 64 * 1024:
            return JSONResponse({"detail": f"the upload is {int(size) / 1e6:.1f} MB; the limit is "
                                           f"{MAX_UPLOAD_BYTES // (1024 * 1024)} MB"}, status_code=413)
        return await call_next(request)

    def _check_style(style: str) -> None:
        if style not in STYLES:
            raise HTTPException(422, f"style must be one of {', '.join(STYLES)}")

    def _case_reports(req: CasesRequest) -> tuple[list[str], str | None]:
        _check_style(req.style)
        try:
            reports = service.reports(req.case_ids, req.style)
            query = req.query_report
            if query is None and req.query_case_id is not None:
                query = service.reports([req.query_case_id], req.style)[0]
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        return reports, query

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "archive_cases": service.archive_size, "run": service.run.name, "trial": service.trial}

    @app.post("/query")
    async def query(request: Request, file: UploadFile | None = File(None), case_id: int | None = Form(None),
                    k: int = Query(5, ge=1, le=50), one_per_patient: bool = Query(False)) -> dict:
        if file is None and case_id is None:
            raise HTTPException(422, "send an image as the multipart field 'file' (or an example 'case_id')")
        if file is not None:
            data = await file.read(MAX_UPLOAD_BYTES + 1)
            try:
                image = await run_in_threadpool(read_scan, data, file.filename or "")
            except UploadError as exc:
                raise HTTPException(413 if "limit is" in str(exc) and "MB" in str(exc) else 400, str(exc)) from None
        else:
            try:
                image = await run_in_threadpool(service.case_image, case_id)
            except KeyError as exc:
                raise HTTPException(404, str(exc.args[0])) from None
        try:  # off the event loop: /health and static files stay responsive under load
            return await run_in_threadpool(service.query, image, k=k, one_per_patient=one_per_patient)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None

    @app.post("/summary")
    def summary(req: CasesRequest) -> dict:
        reports, query = _case_reports(req)
        try:
            out = explainer.summarize(reports, query)
        except (ReportParseError, ValueError) as exc:
            raise HTTPException(400, str(exc)) from None
        return {"summary": out["summary"], "facts": out["facts"], "source": out["source"], "reports": reports}

    @app.post("/ask")
    def ask(req: AskRequest) -> dict:
        reports, query = _case_reports(req)
        try:
            ans, _ = explainer.answer(req.question, reports, query)
        except (ReportParseError, ValueError) as exc:
            raise HTTPException(400, str(exc)) from None
        return {**ans.as_dict(), "corrected": ans.corrected}

    @app.get("/cases/{case_id}")
    def case(case_id: int, style: str = "normal") -> dict:
        _check_style(style)
        try:
            out = service.case(case_id, style)
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        return {**out, "image_url": f"/cases/{case_id}/image.png", "mask_url": f"/cases/{case_id}/mask.png"}

    @app.get("/cases/{case_id}/image.png")
    def case_image(case_id: int, outline: bool = False, size: int = Query(256, ge=32, le=512)) -> Response:
        try:
            img = service.case_image(case_id)
            mask = service.case_mask(case_id) if outline else None
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        return Response(_png(img, mask, size), media_type="image/png")

    @app.get("/cases/{case_id}/mask.png")
    def case_mask(case_id: int) -> Response:
        try:
            mask = service.case_mask(case_id)
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        return Response(_png(mask.astype(np.float32), None, 512), media_type="image/png")

    @app.get("/examples")
    def examples() -> dict:
        return {"examples": service.examples(), "questions": list(PAPER_QUESTIONS), "disclaimer": DISCLAIMER}

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return resources.files("neurocbir").joinpath("static/index.html").read_text()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:  # never a traceback to the client
        log.error("unexpected error on %s: %s", request.url.path, type(exc).__name__)
        return JSONResponse({"detail": "internal error; the server keeps running"}, status_code=500)

    return app


def serve(run: Path, host: str = "127.0.0.1", port: int = 8000, archive: Path | None = None) -> None:
    import uvicorn

    from .llm import LLMUnavailable, llm_from_env
    from .service import ArchiveService

    service = ArchiveService(run, archive) if archive is not None else RetrievalService(run)
    try:
        explainer = Explainer(llm_from_env())
        print("neurocbir: answers are phrased by the configured LLM and checked against the reports", flush=True)
    except LLMUnavailable:
        explainer = Explainer()
    print(f"neurocbir: serving run {run} (trial {service.trial}, {service.archive_size} archive cases) "
          f"at http://{host}:{port}/  (API docs: http://{host}:{port}/docs)", flush=True)
    uvicorn.run(create_app(service, explainer), host=host, port=port, log_level="warning")
