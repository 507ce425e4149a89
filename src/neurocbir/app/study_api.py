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
from neurocbir.app.region_form import region_of
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
    region: str | None = Form(None, description="also search by this box x0,y0,x1,y1 drawn on slice 'region_slice'"),
    region_mask: UploadFile | None = File(None, description="... or by this binary mask (PNG) of that slice's size"),
    region_slice: int | None = Form(
        None, ge=0, description="the slice (0-based, in the study's order) the region is on"
    ),
) -> dict:
    """A whole series, one answer: per slice (tumor found, type, outline, area) and per study (type
    with a study-level confidence, key slice, largest area, volume estimate, similar patients).
    With a region drawn on one slice, that slice is also searched by the region (``region_search``,
    answered as ``POST /query`` with a region answers)."""
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
    drawn, index = None, None
    if region is not None or region_mask is not None:
        if region_slice is None or region_slice >= len(study.slices):
            raise HTTPException(
                400, f"a region needs 'region_slice': the slice it is drawn on, 0 to {len(study.slices) - 1}"
            )
        index = region_slice
        drawn = await region_of(study.slices[index].pixels, region, region_mask)
    out = await run_in_threadpool(answer_study, service, study, k)
    if drawn is not None:
        pixels = study.slices[index].pixels
        out["region_search"] = {"slice": index, **await run_in_threadpool(service.query, pixels, k, region=drawn)}
    digest = hashlib.sha256()
    for s in study.slices:
        digest.update(np.ascontiguousarray(s.pixels, dtype=np.float32).tobytes())
    shown = [p["case_id"] for p in out["patients"]]
    if drawn is not None:
        shown += [r["case_id"] for r in out["region_search"]["retrievals"]]
    fingerprint = digest.hexdigest()[:32] + ("" if drawn is None else f" region slice {index} {drawn.describe()}")
    note(request, shown, fingerprint)
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
