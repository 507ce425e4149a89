"""Text reports for scans, in three styles, and a parser that reads any of them back.

* plain: one fixed sentence;
* normal: radiologist-style prose from a seeded paraphrase generator (or an LLM, cached);
* alternative: normal reports where about half use other units and synonyms
  (cm², "glial tumor", "transverse" ...), the variation that trips LLMs in the paper.

:func:`parse_report` normalises units and synonyms back to structured attributes.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

from neurocbir.errors import InvalidInput
from neurocbir.reports.grounding import PLANE_WORDS, sizes_mm2, types_mentioned

STYLES = ("plain", "normal", "alternative")
PLANES = ("axial", "coronal", "sagittal")
MODALITY = "MRI"
TECHNIQUE = "T1-weighted contrast-enhanced"
TYPE_PHRASE = {"meningioma": "meningioma", "glioma": "glioma", "pituitary": "pituitary tumor"}
ALT_TYPE = {"meningioma": "meningeal tumor", "glioma": "glial tumor", "pituitary": "pituitary gland tumor"}
ALT_PLANE = {"axial": "transverse", "sagittal": "longitudinal", "coronal": "frontal"}


class ReportParseError(InvalidInput):
    """A report lacks an attribute or states it ambiguously."""


@dataclass(frozen=True)
class ReportAttributes:
    tumor_type: str
    plane: str
    area_mm2: float
    modality: str = MODALITY
    technique: str = TECHNIQUE

    def as_dict(self) -> dict:
        return asdict(self)


# --- generation -------------------------------------------------------------------------


def plain_report(a: ReportAttributes) -> str:
    return (
        f"The magnetic resonance imaging (MRI) T1-weighted contrast-enhanced scan in the {a.plane} plane "
        f"displays evidence of a {TYPE_PHRASE[a.tumor_type]} with a size of {a.area_mm2:.2f} mm²."
    )


_OPENINGS = [
    "{tech} {mod} of the brain, {plane} plane.",
    "Study: {mod}, {tech} sequence, {plane} view.",
    "{mod} examination ({tech}) acquired in the {plane} plane.",
    "Imaging was performed with {mod} using a {tech} technique; the slice is {plane}.",
    "Brain {mod}, {tech} images reviewed in the {plane} section.",
    "Technique: {tech} {mod}. Plane: {plane}.",
]
_FINDINGS = [
    "There is a lesion consistent with a {type}, measuring {size} in area.",
    "Findings demonstrate a {type} with a cross-sectional area of {size}.",
    "An enhancing mass compatible with a {type} is seen; its area is {size}.",
    "The study shows a {type} occupying approximately {size}.",
    "A well-defined {type} is identified, with a measured area of {size}.",
    "Appearance is typical of a {type}; tumor area {size}.",
]
_CLOSINGS = [
    "",
    " Clinical correlation is recommended.",
    " No other abnormality is described on this slice.",
    " Comparison with prior imaging is advised.",
    "",
]
_MOD = ["MRI", "magnetic resonance imaging (MRI)", "MR imaging (MRI)"]
_TECH = [
    "T1-weighted contrast-enhanced",
    "contrast-enhanced T1-weighted",
    "post-contrast (contrast-enhanced) T1-weighted",
]
_MM2 = ["{v:.2f} mm²", "{v:.2f} mm^2", "{v:.2f} square millimeters", "{v:.2f} mm2"]
_CM2 = ["{v:.4f} cm²", "{v:.4f} cm^2", "{v:.4f} square centimeters"]


def normal_report(a: ReportAttributes, seed: int, alternative: bool = False) -> str:
    """Seeded paraphrase; with ``alternative`` about half the reports swap units and synonyms."""
    rng = np.random.default_rng([seed, 7])
    swap = alternative and rng.random() < 0.5
    swaps = rng.random(3) < 0.5 if swap else np.zeros(3, bool)
    if swap and not swaps.any():
        swaps[rng.integers(3)] = True
    size = (
        _CM2[rng.integers(len(_CM2))].format(v=a.area_mm2 / 100.0)
        if swaps[0]
        else _MM2[rng.integers(len(_MM2))].format(v=a.area_mm2)
    )
    ttype = ALT_TYPE[a.tumor_type] if swaps[1] else TYPE_PHRASE[a.tumor_type]
    plane = ALT_PLANE[a.plane] if swaps[2] else a.plane
    opening = _OPENINGS[rng.integers(len(_OPENINGS))].format(
        tech=_TECH[rng.integers(len(_TECH))], mod=_MOD[rng.integers(len(_MOD))], plane=plane
    )
    finding = _FINDINGS[rng.integers(len(_FINDINGS))].format(type=ttype, size=size)
    text = f"{opening} {finding}{_CLOSINGS[rng.integers(len(_CLOSINGS))]}"
    return text[0].upper() + text[1:]


def make_report(a: ReportAttributes, style: str, seed: int) -> str:
    if style == "plain":
        return plain_report(a)
    if style in ("normal", "alternative"):
        return normal_report(a, seed, alternative=style == "alternative")
    raise InvalidInput(f"unknown report style {style!r}; choose one of {STYLES}")


def case_attributes(table, row: int) -> ReportAttributes:
    """Attributes of one case of a :class:`neurocbir.data.cases.CaseTable`."""
    from neurocbir.data.cases import CLASS_NAMES

    plane = str(table.plane[row])
    if plane not in PLANES:
        raise InvalidInput(f"case {int(table.idx[row])} has no anatomical plane, so no report can be written")
    return ReportAttributes(CLASS_NAMES[int(table.label[row])], plane, round(float(table.area_mm2[row]), 2))


# --- parsing ----------------------------------------------------------------------------

_TYPE_RE = re.compile(
    r"\b(pituitary\s+(?:gland\s+)?(?:tumou?r|adenoma|macroadenoma|lesion|mass)|pituitary|"
    r"meningeal\s+tumou?r|meningiomas?|glial\s+tumou?r|gliomas?|glioblastoma)\b",
    re.I,
)
_PLANE_RE = re.compile(rf"\b({'|'.join(PLANE_WORDS)})\b(\s+(?:plane|view|section|slice|image|orientation))?", re.I)


def parse_report(text: str) -> ReportAttributes:
    """Structured attributes of a report in any style; raises :class:`ReportParseError`
    naming what is missing or ambiguous."""
    if not isinstance(text, str) or not text.strip():
        raise ReportParseError("empty report: no modality, technique, tumor type, plane or size")
    missing, problems = [], []
    types = {t for m in _TYPE_RE.finditer(text) for t in types_mentioned(m.group(1))}
    if not types:
        missing.append("tumor type (meningioma, glioma or pituitary tumor)")
    elif len(types) > 1:
        problems.append(f"several tumor types ({', '.join(sorted(types))})")
    planes_all = [(PLANE_WORDS[m.group(1).lower()], bool(m.group(2))) for m in _PLANE_RE.finditer(text)]
    explicit = {p for p, e in planes_all if e}
    planes = explicit or {p for p, _ in planes_all}
    if not planes:
        missing.append("anatomical plane (axial, coronal or sagittal)")
    elif len(planes) > 1:
        problems.append(f"several planes ({', '.join(sorted(planes))})")
    sizes = sizes_mm2(text)
    if not sizes:
        missing.append("tumor size with a unit (mm² or cm²)")
    elif len({round(s, 2) for s in sizes}) > 1:
        problems.append(f"several sizes ({', '.join(f'{s:g} mm²' for s in sizes)})")
    if not re.search(r"\bMRI?\b|magnetic\s+resonance", text, re.I):
        missing.append("modality (MRI)")
    t1 = re.search(r"\bT1(?:-?\s*weighted|w)?\b", text, re.I)
    contrast = re.search(r"contrast|gadolinium|\bgd\b|post-?\s*contrast", text, re.I)
    if not t1:
        missing.append("technique (T1-weighted)")
    if missing or problems:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + problems
        raise ReportParseError("cannot read report: " + "; ".join(parts))
    technique = "T1-weighted contrast-enhanced" if contrast else "T1-weighted"
    return ReportAttributes(types.pop(), planes.pop(), round(sizes[0], 2), MODALITY, technique)


# --- LLM-written normal reports (cached) --------------------------------------------------


def llm_normal_reports(table, llm, cache_path, rows=None, max_tries: int = 2) -> dict[int, str]:
    """Normal-style reports written by an LLM, once per case, cached in a JSON file.

    Each report is checked with :func:`parse_report`; one that misstates an attribute is
    asked for again, then replaced by the offline paraphrase (and marked so in the cache).
    """
    import json
    from pathlib import Path

    from neurocbir.files import write_json

    cache_path = Path(cache_path)
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    rows = range(len(table)) if rows is None else rows
    for row in rows:
        key = str(int(table.idx[row]))
        if key in cache:
            continue
        a = case_attributes(table, row)
        text, source = None, "paraphrase"
        for _ in range(max_tries):
            reply = llm.chat(
                [
                    {"role": "system", "content": "You write short radiology reports. Use only the facts given."},
                    {
                        "role": "user",
                        "content": (
                            "Write a two-sentence radiology report for one brain MRI slice with these facts: modality MRI; "
                            f"technique T1-weighted contrast-enhanced; anatomical plane {a.plane}; finding "
                            f"{TYPE_PHRASE[a.tumor_type]}; tumor area {a.area_mm2:.2f} mm². State every fact, the area exactly "
                            "as given in mm². No patient details."
                        ),
                    },
                ]
            )
            try:
                if parse_report(reply) == a:
                    text, source = reply.strip(), "llm"
                    break
            except ReportParseError:
                pass
        cache[key] = {"text": text or normal_report(a, int(key)), "source": source}
        write_json(cache_path, cache, indent=1)
    return {int(k): v["text"] for k, v in cache.items()}


def llm_reports_path():
    """Where LLM-written normal reports are cached (under the neurocbir cache folder)."""
    from neurocbir.files import default_cache_dir

    return default_cache_dir() / "reports" / "normal_llm.json"


def cached_llm_reports() -> dict[int, str]:
    """LLM-written normal reports generated so far (empty when none were written)."""
    import json

    path = llm_reports_path()
    if not path.is_file():
        return {}
    return {int(k): v["text"] for k, v in json.loads(path.read_text()).items() if v.get("source") == "llm"}
