"""``POST /query/study``: a whole series in one request (several files, a multi-frame DICOM, a
NIfTI volume, or a series on the server's PACS), one answer, and optionally its DICOM SEG and SR
stored back in the PACS (:mod:`neurocbir.serving.studies`, :mod:`neurocbir.serving.results_dicom`)."""

from __future__ import annotations

import hashlib

import numpy as np
from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool

from neurocbir.app.access import note
from neurocbir.app.images import data_url
from neurocbir.data.studies import MAX_STUDY_BYTES, MAX_STUDY_SLICES

router = APIRouter(tags=["query"])


@router.post(
    "/query/study",
    max_body_size=MAX_STUDY_BYTES + 1024 * 1024,
    form_limits={"max_files": MAX_STUDY_SLICES, "max_fields": 8},
)
async def query_study(
    request: Request,
    files: list[UploadFile] | None = File(None, description="the study's slices (DICOM, PNG/JPEG, .mat) or one NIfTI"),
    series_uid: str | None = Form(None, description="a series on the server's PACS, instead of files"),
    k: int = Query(5, ge=1, le=50),
    write_back: bool = Query(False, description="store the SEG and SR in the server's PACS (DICOM studies)"),
    thumbnails: bool = Query(False, description="add each slice as a small PNG data URL, and the key slice at 512 px"),
) -> dict:
    """A whole series, one answer: per slice (tumor found, type, outline, area) and per study (type
    with a study-level confidence, key slice, largest area, volume estimate, similar patients)."""
    from neurocbir.data.studies import read_study
    from neurocbir.retrieval.dicomweb import read_series
    from neurocbir.serving.results_dicom import store_results
    from neurocbir.serving.studies import answer_study

    service, pacs = request.app.state.service, request.app.state.dicomweb
    if (files is None) == (series_uid is None):
        raise HTTPException(422, "send the study as multipart 'files', or a PACS 'series_uid'")
    if files is not None:
        parts = [(await f.read(MAX_STUDY_BYTES + 1), f.filename or "") for f in files]
        study = await run_in_threadpool(read_study, parts)
    else:
        if pacs is None:
            raise HTTPException(400, "this server has no PACS: start it with `neurocbir serve --dicomweb URL`")
        study = await run_in_threadpool(read_series, pacs, series_uid)
    out = await run_in_threadpool(answer_study, service, study, k)
    digest = hashlib.sha256()
    for s in study.slices:
        digest.update(np.ascontiguousarray(s.pixels, dtype=np.float32).tobytes())
    note(request, [p["case_id"] for p in out["patients"]], digest.hexdigest()[:32])
    if thumbnails:
        for s, shown in zip(study.slices, out["slices"]):
            shown["thumbnail"] = data_url(s.pixels, 96)
        key = out["key_slice"]
        out["key_image"] = data_url(study.slices[key["index"]].pixels, 512) if key else None
    if write_back:
        if pacs is None or study.kind != "dicom":
            raise HTTPException(400, "write_back needs a DICOM study and a server started with --dicomweb")
        out["written_back"] = await run_in_threadpool(store_results, pacs, study, out)
    return out
