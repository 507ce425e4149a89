"""Results back to the PACS, as the viewers there show them: a DICOM Segmentation (the predicted
tumor, binary, on the source images, the algorithm identified) and a DICOM Structured Report
(TID 1500 measurement report: the tumor's area in mm², the predicted tumor type with its
confidence, "decision support, not a diagnosis", and the retrieved archive cases as evidence),
both built with highdicom and both referencing the source study, series and instances.

They carry the source's patient and study modules, as DICOM requires of derived objects that go
back to the same PACS; nothing of them is logged. The SEG's mask is the outline the app shows,
rasterised on the source image's pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from neurocbir import __version__
from neurocbir.data.studies import Study
from neurocbir.errors import InvalidInput
from neurocbir.serving.service import DISCLAIMER

MANUFACTURER = "neurocbir"
PRIVATE = "99NEUROCBIR"  # coding scheme of neurocbir's own concepts (a 99 prefix: private by the standard)


def _code(value: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value[:16], scheme_designator=PRIVATE, meaning=meaning[:64])


def _algorithm():
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.AlgorithmIdentificationSequence(
        name="neurocbir", family=codes.DCM.ArtificialIntelligence, version=__version__
    )


#: type-2 attributes of the patient and study modules that a derived object copies from its
#: source: anonymised files routinely lack them; they are then written empty, as DICOM allows
TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
#: what a SEG and an SR must reference: without it they cannot be built
TYPE1_REFERENCED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def source_headers(study: Study) -> list:
    """The study's source datasets as the SEG and SR read them: a shallow copy of each, the absent
    type-2 patient and study attributes added empty; a missing UID is a clear error."""
    out, copies = [], {}
    for s in study.slices:
        ds = s.dataset
        if id(ds) not in copies:
            for name in TYPE1_REFERENCED:
                if not str(ds.get(name, "") or "").strip():
                    raise InvalidInput(f"the DICOM source lacks {name}: a SEG and an SR must reference it")
            header = ds.copy()
            for name in TYPE2_COPIED:
                if name not in header:
                    setattr(header, name, "")
            copies[id(ds)] = header
        out.append(copies[id(ds)])
    return out


def outline_mask(outline: dict | None, shape: tuple[int, int]) -> np.ndarray:
    """The app's tumor outline (x, y polygon in the image's pixels) as a binary mask."""
    from skimage.draw import polygon

    mask = np.zeros(shape, bool)
    if outline:
        xy = np.asarray(outline["outline"], float)
        mask[polygon(xy[:, 1], xy[:, 0], shape)] = True
    return mask


def build_seg(study: Study, answer: dict):
    """The Segmentation of the study's outlined tumors (None where no slice has one)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    sources = source_headers(study)
    masks = np.stack([outline_mask(a["query_tumor"], s.pixels.shape) for s, a in zip(study.slices, answer["slices"])])
    if not masks.any():
        return None
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Tumor (predicted)",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(),
    )
    multiframe = len({id(d) for d in sources}) == 1 and len(sources) > 1
    return hd.seg.Segmentation(
        source_images=[sources[0]] if multiframe else sources,
        pixel_array=masks.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=generate_uid(),
        series_number=9001,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="neurocbir retrieval-based decision support",
        software_versions=__version__,
        device_serial_number="0",
        content_description="predicted tumor; decision support, not a diagnosis",
        content_label="TUMOR",
    )


def build_sr(study: Study, answer: dict, seg=None):
    """The TID 1500 measurement report of the study's answer."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    key = answer["key_slice"]
    index = key["index"] if key else 0
    source, headers = study.slices[index], source_headers(study)
    ds = headers[index]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name="neurocbir", manufacturer_name=MANUFACTURER, model_name=__version__
        ),
    )
    evaluations = [
        hd.sr.QualitativeEvaluation(_code("disclaimer", "Disclaimer"), _code("not-diagnosis", DISCLAIMER[:64]))
    ]
    measurements = []
    if answer["prediction"] is None:
        evaluations.append(
            hd.sr.QualitativeEvaluation(_code("tumor-found", "Tumor found"), _code("no", "No tumor found"))
        )
    else:
        if answer.get("presence_warning"):  # a tumor only by the decoder's veto on its slices: said so
            evaluations.append(
                hd.sr.QualitativeEvaluation(
                    _code("tumor-found", "Tumor found"), _code("uncertain", "Tumor presence uncertain")
                )
            )
        if answer.get("no_close_tumor_case"):  # its typed evidence lies beyond the run's reach: said so
            evaluations.append(
                hd.sr.QualitativeEvaluation(
                    _code("type-evidence", "Tumor-type evidence"), _code("not-close", "No close tumor case")
                )
            )
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                _code("tumor-type", "Predicted tumor type"), _code(answer["prediction"], answer["prediction"])
            )
        )
        measurements.append(
            hd.sr.Measurement(
                name=_code("type-confidence", f"Confidence in the predicted type ({answer['calibrated']})"),
                value=round(100 * answer["confidence"], 1),
                unit=codes.UCUM.Percent,
                algorithm_id=hd.sr.AlgorithmIdentification(name="neurocbir", version=__version__),
            )
        )
        if key and key["area_mm2"]:
            measurements.append(
                hd.sr.Measurement(
                    name=codes.SCT.Area,
                    value=float(key["area_mm2"]),
                    unit=codes.UCUM.SquareMillimeter,
                    algorithm_id=hd.sr.AlgorithmIdentification(name="neurocbir", version=__version__),
                )
            )
    for p in answer["patients"]:
        evaluations.append(
            hd.sr.QualitativeEvaluation(
                _code(f"evidence-{p['rank']}", f"Retrieved archive case {p['rank']}"),
                _code(f"case-{p['case_id']}", f"case {p['case_id']}: {p['label']}, distance {p['distance']:.3f}"),
            )
        )
    group_args = {}
    outline = answer["slices"][key["index"]]["query_tumor"] if key else None
    if outline:
        group_args["referenced_region"] = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=np.vstack([np.asarray(outline["outline"], float), np.asarray(outline["outline"][:1], float)]),
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
                **({"referenced_frame_numbers": [source.frame]} if source.frame else {}),
            ),
        )
    else:
        group_args["referenced_region"] = None
    group = (
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="neurocbir tumor"),
            finding_type=codes.SCT.Neoplasm,
            measurements=measurements or None,
            qualitative_evaluations=evaluations,
            **group_args,
        )
        if group_args["referenced_region"] is not None
        else hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="neurocbir tumor"),
            finding_type=codes.SCT.Neoplasm,
            measurements=measurements or None,
            qualitative_evaluations=evaluations,
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.BrainMRI if hasattr(codes.LN, "BrainMRI") else codes.SCT.ImagingProcedure,
        imaging_measurements=[group],
    )
    evidence = list({d.SOPInstanceUID: d for d in headers}.values())
    return hd.sr.Comprehensive3DSR(
        evidence=evidence + ([seg] if seg is not None else []),
        content=report,
        series_instance_uid=generate_uid(),
        series_number=9002,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
    )


def build_results(study: Study, answer: dict):
    """(SEG or None, SR) of a study's answer; a source whose attributes highdicom cannot use (a
    malformed value, an inconsistent geometry) is a clear error naming what it says."""
    if study.kind != "dicom":
        raise InvalidInput("a DICOM SEG and SR need DICOM source images (this study is not DICOM)")
    try:
        seg = build_seg(study, answer)
        return seg, build_sr(study, answer, seg)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        if isinstance(exc, InvalidInput):
            raise
        raise InvalidInput(f"the DICOM source cannot be referenced by a SEG and an SR ({exc})") from exc


def write_results(study: Study, answer: dict, out: Path | str) -> dict:
    """``out/seg.dcm`` (where a tumor is outlined) and ``out/sr.dcm``; returns their paths."""
    from neurocbir.files import atomic_write

    if study.kind != "dicom":
        raise InvalidInput("a DICOM SEG and SR need DICOM source images (this study is not DICOM)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seg, sr = build_results(study, answer)
    written = {}
    for name, ds in (("seg.dcm", seg), ("sr.dcm", sr)):
        if ds is not None:
            atomic_write(out / name, lambda tmp, ds=ds: ds.save_as(tmp, enforce_file_format=True))
            written[name] = str(out / name)
    return written


def store_results(pacs: str, study: Study, answer: dict) -> dict:
    """STOW-RS the SEG (if any) and the SR to the PACS; returns their SOP Instance UIDs."""
    from neurocbir.retrieval.dicomweb import store_instances

    seg, sr = build_results(study, answer)
    datasets = [d for d in (seg, sr) if d is not None]
    store_instances(pacs, datasets)
    return {("seg" if d is seg else "sr"): str(d.SOPInstanceUID) for d in datasets}
