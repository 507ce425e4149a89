"""PACS integration over DICOMweb (QIDO-RS to search, WADO-RS to retrieve), with the maintained
``dicomweb-client``.

* :func:`scan_dicomweb` lists a server's instances that a labels CSV names, as
  :class:`neurocbir.retrieval.casefiles.CaseFile` s, so ``neurocbir add --dicomweb URL --labels CSV`` ingests
  them like a folder: resumable (an instance's archive key is a hash of its SOP Instance UID,
  so a rerun skips what is stored without downloading it again), one committed batch at a time.
* :func:`read_instance` fetches one instance's pixels and pixel spacing by its UID, for
  ``neurocbir query --dicomweb URL --instance UID`` and ``POST /query`` with ``instance_uid``.

De-identification on ingest: the archive keeps a pixel-only copy of each slice (``.npy``, no
DICOM header), the label, plane, size and report from the CSV, and the patient id only as the
archive's salted hash. Names, ids, dates and UIDs are not stored.

Credentials, when the server asks for them: ``$NEUROCBIR_DICOMWEB_USER`` and
``$NEUROCBIR_DICOMWEB_PASSWORD`` (HTTP basic), or ``$NEUROCBIR_DICOMWEB_TOKEN`` (bearer).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from neurocbir.errors import UpstreamError

SOP_UID, STUDY_UID, SERIES_UID, PATIENT_ID = "00080018", "0020000D", "0020000E", "00100020"
LABEL_COLUMNS = "sop_instance_uid,label[,patient_id,plane,area_mm2,report]"


class PacsError(UpstreamError, ValueError):
    """The DICOMweb server cannot be reached, refuses us, or lacks the instance."""


def _session(url: str):
    import requests
    from dicomweb_client.session_utils import create_session

    if not url.startswith(("http://", "https://")):
        raise PacsError(f"{url!r} is not a DICOMweb URL (http://host:port/dicom-web)", status=400)
    session = create_session()
    # no gzip: compressing each 0.5 MB slice cost Orthanc ~28 ms of its 31 ms per instance on
    # loopback (benchmarks/dicomweb_ingest.py); a PACS sits on the hospital's LAN
    session.headers["Accept-Encoding"] = "identity"
    user, password = os.environ.get("NEUROCBIR_DICOMWEB_USER"), os.environ.get("NEUROCBIR_DICOMWEB_PASSWORD")
    token = os.environ.get("NEUROCBIR_DICOMWEB_TOKEN")
    if user:
        session.auth = requests.auth.HTTPBasicAuth(user, password or "")
    elif token:
        session.headers["Authorization"] = f"Bearer {token}"
    return session


@cache
def client(url: str, timeout: float = 30.0):
    """A DICOMweb client for ``url`` (one per URL and process: it keeps its connections)."""
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(url.rstrip("/"), session=_session(url), timeout=timeout)


def _call(url: str, what: str, fn, *args, **kwargs):
    """Run one client call; every transport or HTTP failure becomes a :class:`PacsError` that
    says what to check."""
    import requests

    try:
        return fn(*args, **kwargs)
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else None
        if code in (401, 403):
            raise PacsError(
                f"the DICOMweb server at {url} refused access (HTTP {code}) while {what}: set "
                "NEUROCBIR_DICOMWEB_USER and NEUROCBIR_DICOMWEB_PASSWORD (or NEUROCBIR_DICOMWEB_TOKEN)"
            ) from None
        if code == 404:
            raise PacsError(f"the DICOMweb server at {url} has no such resource ({what})", status=404) from None
        raise PacsError(f"the DICOMweb server at {url} answered HTTP {code} while {what}") from None
    except requests.RequestException as exc:
        raise PacsError(f"cannot reach the DICOMweb server at {url} ({type(exc).__name__}) while {what}") from None
    except Exception as exc:  # a malformed answer (multipart, DICOM or JSON) raises many types
        raise PacsError(
            f"the DICOMweb server at {url} sent an unreadable answer while {what} ({type(exc).__name__})"
        ) from None


def _value(item: dict, tag: str) -> str | None:
    values = item.get(tag, {}).get("Value") or []
    return str(values[0]) if values else None


@dataclass(frozen=True)
class InstanceRef:
    """Where an instance lives on the server (WADO-RS needs all three UIDs)."""

    study: str
    series: str
    sop: str
    patient_id: str | None = None

    @property
    def key(self) -> str:
        """The archive key: a hash of the SOP Instance UID, so resuming needs no download."""
        return hashlib.sha256(f"dicomweb:{self.sop}".encode()).hexdigest()


def list_instances(url: str, study: str | None = None, sop: str | None = None) -> list[InstanceRef]:
    """QIDO-RS: every instance on the server (or in one study, or the one with this SOP
    Instance UID), paged until the server has no more."""
    filters = {"SOPInstanceUID": sop} if sop else None
    found = _call(
        url,
        "searching instances",
        client(url).search_for_instances,
        study_instance_uid=study,
        fields=["PatientID"],
        search_filters=filters,
        get_remaining=True,
    )
    out = []
    for item in found:
        ref = [_value(item, t) for t in (STUDY_UID, SERIES_UID, SOP_UID)]
        if all(ref):
            out.append(InstanceRef(*ref, patient_id=_value(item, PATIENT_ID)))
    return out


def fetch_dataset(url: str, ref: InstanceRef):
    """WADO-RS: the instance as a pydicom Dataset."""
    return _call(url, f"retrieving instance {ref.sop}", client(url).retrieve_instance, ref.study, ref.series, ref.sop)


def find_instance(url: str, sop_uid: str) -> InstanceRef:
    sop_uid = sop_uid.strip()
    if not sop_uid or len(sop_uid) > 64 or not all(c.isdigit() or c == "." for c in sop_uid):
        raise PacsError(f"{sop_uid!r} is not a DICOM UID (digits and dots, at most 64 characters)", status=400)
    refs = list_instances(url, sop=sop_uid)
    if not refs:
        raise PacsError(f"the DICOMweb server at {url} has no instance {sop_uid}", status=404)
    return refs[0]


def read_instance(url: str, sop_uid: str) -> tuple[np.ndarray, tuple[float, float] | None]:
    """The pixels and pixel spacing (mm) of one instance, by its SOP Instance UID."""
    from neurocbir.data.uploads import dataset_pixels

    return dataset_pixels(fetch_dataset(url, find_instance(url, sop_uid)))


def read_series(url: str, series_uid: str):
    """A whole series from the PACS (QIDO-RS, then WADO-RS per instance) as a study, in anatomical
    order (:func:`neurocbir.data.studies.dicom_study`); its headers are kept for the SEG and SR."""
    from neurocbir.data.studies import MAX_STUDY_SLICES, dataset_slices, dicom_study

    series_uid = series_uid.strip()
    if not series_uid or len(series_uid) > 64 or not all(c.isdigit() or c == "." for c in series_uid):
        raise PacsError(f"{series_uid!r} is not a DICOM UID (digits and dots, at most 64 characters)", status=400)
    found = _call(
        url,
        "searching the series",
        client(url).search_for_instances,
        search_filters={"SeriesInstanceUID": series_uid},
        get_remaining=True,
    )
    refs = [InstanceRef(*[_value(i, t) for t in (STUDY_UID, SERIES_UID, SOP_UID)]) for i in found]
    refs = [r for r in refs if r.study and r.series == series_uid and r.sop]
    if not refs:
        raise PacsError(f"the DICOMweb server at {url} has no series {series_uid}", status=404)
    if len(refs) > MAX_STUDY_SLICES:
        raise PacsError(
            f"series {series_uid} holds {len(refs)} instances; a study holds at most {MAX_STUDY_SLICES}", status=413
        )
    return dicom_study([s for r in refs for s in dataset_slices(fetch_dataset(url, r), f"instance {r.sop}")])


def store_instances(url: str, datasets: list) -> None:
    """STOW-RS: store DICOM objects (a SEG and an SR) on the server."""
    _call(url, "storing results", client(url).store_instances, datasets)


def scan_dicomweb(url: str, labels: Path | str, copies: Path | str, study: str | None = None) -> tuple[list, int]:
    """The server's instances that ``labels`` (a CSV keyed by SOP Instance UID) labels, as
    case files whose pixels are fetched when the ingest reaches them and kept, header-free, in
    ``copies``. Returns (case files, number of instances on the server without a label)."""
    from neurocbir.retrieval.archive import ArchiveError
    from neurocbir.retrieval.casefiles import CaseFile, read_rows, row_attributes

    table = {}
    for where, r in read_rows(Path(labels), {"sop_instance_uid", "label"}, LABEL_COLUMNS):
        table[r["sop_instance_uid"].strip()] = (row_attributes(r, where), (r.get("patient_id") or "").strip())
    refs = list_instances(url, study)
    on_server = {r.sop for r in refs}
    if table and not on_server & set(table):
        raise ArchiveError(
            f"none of the {len(table)} instances in {labels} is on the DICOMweb server at {url}"
            + (f" in study {study}" if study else "")
        )
    copies = Path(copies)
    files = []
    for ref in refs:
        if ref.sop not in table:
            continue
        (label, plane, area, report), patient_id = table[ref.sop]
        files.append(
            CaseFile(
                copies / f"{ref.key}.npy",
                label,
                patient_id or ref.patient_id or ref.study,
                plane,
                area,
                report=report,
                load=lambda r=ref: _fetch_and_keep(url, r, copies),
                key=ref.key,
                name=f"instance {ref.sop}",
            )
        )
    return files, len(refs) - len(files)


def _fetch_and_keep(url: str, ref: InstanceRef, copies: Path) -> np.ndarray:
    """Fetch the instance's pixels and keep a header-free copy in the archive (so the app can
    show the case without the PACS, and no patient data is stored)."""
    from neurocbir.data.uploads import dataset_pixels
    from neurocbir.files import atomic_write

    pixels, _ = dataset_pixels(fetch_dataset(url, ref))
    copies.mkdir(parents=True, exist_ok=True)
    atomic_write(copies / f"{ref.key}.npy", lambda tmp: np.save(tmp, pixels, allow_pickle=False))
    return pixels


def to_dicom(
    image: np.ndarray,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    pixel_spacing_mm: float = 0.49,
    patient_name: str = "",
    position_mm: float | None = None,
    frame_of_reference_uid: str | None = None,
    instance_number: int = 1,
    slice_thickness_mm: float = 6.0,
):
    """An MR Image Storage dataset of one slice (what a scanner sends a PACS): used to load the
    figshare slices into a test PACS and by the DICOMweb benchmark. With ``position_mm`` the slice
    lies in an axial stack (its position along the normal), as a series' slices do."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    pixels = np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.preamble = meta, b"\0" * 128  # a Part-10 file, as a scanner writes it
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientID, ds.PatientName, ds.Modality = patient_id, patient_name, "MR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing = [pixel_spacing_mm, pixel_spacing_mm]
    ds.InstanceNumber, ds.SeriesNumber, ds.StudyID = instance_number, 1, "1"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "", ""
    ds.PatientBirthDate, ds.PatientSex, ds.Manufacturer = "", "O", "neurocbir-test"
    if position_mm is not None:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, float(position_mm)]
        ds.FrameOfReferenceUID = frame_of_reference_uid or study_uid + ".9"
        ds.SliceThickness = slice_thickness_mm
    ds.PixelData = pixels.tobytes()
    return ds
