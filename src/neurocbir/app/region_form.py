"""A region drawn on a scan, as a request sends it: a box field or a mask file (not both)."""

from __future__ import annotations

import numpy as np
from fastapi import HTTPException, UploadFile
from fastapi.concurrency import run_in_threadpool

from neurocbir.data.regions import Region, box_region, read_region_mask
from neurocbir.data.uploads import MAX_UPLOAD_BYTES


async def region_of(image: np.ndarray, box: str | None, mask: UploadFile | None) -> Region | None:
    """The drawn region a query searches by, if any (a box or a mask, not both)."""
    if box is not None and mask is not None:
        raise HTTPException(422, "send the region as a box ('region') or as a mask ('region_mask'), not both")
    if mask is not None:
        return await run_in_threadpool(read_region_mask, await mask.read(MAX_UPLOAD_BYTES + 1), image.shape[:2])
    return box_region(box, image.shape[:2]) if box else None
