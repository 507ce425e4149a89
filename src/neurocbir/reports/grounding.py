"""Grounding: what report text says, read one way everywhere.

The report parser, the LLM answer check and the Fig. 4 grading all need the same readings:
sizes with their units (mm² or cm², converted to mm²), tumor-type and plane words with
their synonyms, references to retrieved reports, and when two sizes are the same. They live
here once, with the facts computed from a set of reports and the grading of a summary
against them.
"""

from __future__ import annotations

import re

import numpy as np

from neurocbir.errors import InvalidInput

# --- vocabulary -------------------------------------------------------------------------------

#: plane word -> plane (the synonyms that the alternative report style and LLMs use)
PLANE_WORDS = {
    "axial": "axial",
    "transverse": "axial",
    "transaxial": "axial",
    "horizontal": "axial",
    "coronal": "coronal",
    "frontal": "coronal",
    "sagittal": "sagittal",
    "longitudinal": "sagittal",
}
#: tumor type -> the stem that any of its names contains ("glial tumor", "meningeal tumor", ...)
TYPE_STEMS = {"meningioma": "mening", "glioma": "glio|glial", "pituitary": "pituitar"}

_NUM = r"(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:[.,]\d+)?)"  # 1,204.6 | 1204.6 | 12,5 (decimal comma)
_MM2 = r"(?:mm\s*(?:²|\^\s*2|2)|sq\.?\s*mm|square\s+millimet(?:er|re)s?)"
_CM2 = r"(?:cm\s*(?:²|\^\s*2|2)|sq\.?\s*cm|square\s+centimet(?:er|re)s?)"
SIZE_RE = re.compile(rf"{_NUM}\s*(?:({_MM2})|({_CM2}))", re.I)
RANGE_RE = re.compile(rf"{_NUM}\s*(?:to|-|–|and)\s*\d[\d.,]*\s*(?:({_MM2})|({_CM2}))", re.I)
_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
_WORD_NUMBER = {w: i for words in (_WORDS, _ORDINALS) for i, w in enumerate(words, 1)}
# a report number: an integer that is no part of a size (so "report 2, 796.65 mm²" names report 2 only)
_REF = rf"(?:#\s*)?(?:\d+(?![.,]?\d)(?!\s*(?:mm|cm|sq|square))|{'|'.join(_WORDS)})\b"
_SEP = r"\s*(?:,\s*(?:and|or)?|\band\b|\bor\b|&|\bto\b|\bthrough\b|-|–)\s*"
#: "report 3", "report #3", "reports 1, 2 and 5", "report numbers 1-3", "report no. 4", "report five"
REPORT_LIST_RE = re.compile(rf"\breports?\s*(?:numbers?|nos?\.?|#)?\s*({_REF}(?:{_SEP}{_REF})*)", re.I)
#: "the fifth report", "the 2nd retrieved report"
ORDINAL_REF_RE = re.compile(rf"\b({'|'.join(_ORDINALS)}|\d+(?:st|nd|rd|th))\s+(?:retrieved\s+)?report\b", re.I)


def _number(text: str) -> float:
    if re.fullmatch(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?", text):
        return float(text.replace(",", ""))
    return float(text.replace(",", "."))


def _mm2(match: re.Match) -> float:
    v = _number(match.group(1))
    return v if match.group(2) else v * 100.0


def sizes_mm2(text: str, ranges: bool = False) -> list[float]:
    """Every size stated in ``text``, in mm², in order; ``ranges`` adds the first bound of
    "150 to 2400 mm²" (whose unit follows only the second)."""
    out = [_mm2(m) for m in SIZE_RE.finditer(text)]
    if ranges:
        out += [_mm2(m) for m in RANGE_RE.finditer(text)]
    return out


def same_size(a: float, b: float) -> bool:
    """Equal as reported sizes: within rounding (0.6 mm² or 0.5%)."""
    return abs(a - b) <= max(0.6, 0.005 * abs(b))


def _ref_number(token: str) -> int:
    token = token.strip().lstrip("#").strip().lower()
    return _WORD_NUMBER[token] if token in _WORD_NUMBER else int(re.sub(r"\D", "", token))


def report_refs(text: str) -> set[int]:
    """The report numbers that ``text`` names: lists ("reports 1, 2 and 5"), ranges ("reports
    1-3", "1 to 3"), "number", "no.", "#", number words and ordinals ("the fifth report")."""
    refs: set[int] = set()
    for m in REPORT_LIST_RE.finditer(text):
        chunk = m.group(1)
        numbers = [_ref_number(t) for t in re.findall(_REF, chunk, re.I)]
        refs.update(numbers)
        for a, b in re.findall(rf"({_REF})\s*(?:\bto\b|\bthrough\b|-|–)\s*({_REF})", chunk, re.I):
            lo, hi = _ref_number(a), _ref_number(b)
            refs.update(range(lo, hi + 1) if 0 < hi - lo <= 50 else ())
    refs.update(_ref_number(m.group(1)) for m in ORDINAL_REF_RE.finditer(text))
    return refs


#: a mention of the query scan ("the query", "the query's tumor")
QUERY_RE = re.compile(r"\bquery(?:'s|’s)?\b", re.I)


def attributed_sizes(text: str) -> list[tuple[int | str, float]]:
    """The sizes that ``text`` gives to one subject, as (report number or "query", mm²).

    A size belongs to the nearest mention before it (one report, or the query) with no other size
    in between: "Report 3 (734.23 mm²) is closest to the query's (798.57 mm²)" gives
    [(3, 734.23), ("query", 798.57)]. Sizes after a list of reports, or with no mention before
    them, are left out. This is what catches an answer whose numbers are all real but swapped."""
    mentions: list[tuple[int, int | str | None]] = []
    for m in REPORT_LIST_RE.finditer(text):
        refs = report_refs(m.group(0))
        mentions.append((m.end(), next(iter(refs)) if len(refs) == 1 else None))
    mentions += [(m.end(), _ref_number(m.group(1))) for m in ORDINAL_REF_RE.finditer(text)]
    mentions += [(m.end(), "query") for m in QUERY_RE.finditer(text)]
    mentions.sort(key=lambda x: x[0])
    out, previous_end = [], 0
    for m in SIZE_RE.finditer(text):
        before = [subject for end, subject in mentions if previous_end <= end <= m.start()]
        if before and before[-1] is not None:
            out.append((before[-1], _mm2(m)))
        previous_end = m.end()
    return out


def types_mentioned(text: str) -> set[str]:
    return {t for t, stem in TYPE_STEMS.items() if re.search(stem, text, re.I)}


def planes_mentioned(text: str) -> set[str]:
    return {p for w, p in PLANE_WORDS.items() if re.search(w, text, re.I)}


# --- facts and grading --------------------------------------------------------------------------


def in_order(numbers: list[int]) -> bool:
    """Reports numbered 1, 2, ... (every retrieved case had one)."""
    return list(numbers) == list(range(1, len(numbers) + 1))


def compute_facts(
    reports: list, query=None, query_area_estimate_mm2: float | None = None, numbers: list[int] | None = None
) -> dict:
    """Facts about retrieved reports (:class:`neurocbir.reports.text.ReportAttributes`), all sizes
    in mm². Reports are numbered 1, 2, ... or by ``numbers`` (their ranks among the retrieved cases,
    where some of those have no report). Without a query report, a query scan's tumor area
    estimated from its predicted outline stands in for size comparisons (flagged ``estimated``)."""
    if not reports:
        raise InvalidInput("no reports to summarise")
    nums = list(range(1, len(reports) + 1)) if numbers is None else [int(n) for n in numbers]
    if len(nums) != len(reports) or len(set(nums)) != len(nums) or min(nums) < 1:
        raise InvalidInput("one distinct report number (1 or more) per report")
    sizes = np.array([r.area_mm2 for r in reports])
    types: dict[str, list[int]] = {}
    planes: dict[str, list[int]] = {}
    for n, r in zip(nums, reports):
        types.setdefault(r.tumor_type, []).append(n)
        planes.setdefault(r.plane, []).append(n)
    facts = {
        "n_reports": len(reports),
        "report_numbers": nums,
        "modalities": sorted({r.modality for r in reports}),
        "techniques": sorted({r.technique for r in reports}),
        "tumor_types": types,
        "planes": planes,
        "size_min_mm2": float(sizes.min()),
        "size_min_report": nums[int(np.argmin(sizes))],
        "size_max_mm2": float(sizes.max()),
        "size_max_report": nums[int(np.argmax(sizes))],
        "size_mean_mm2": round(float(sizes.mean()), 2),
        "sizes_mm2": {str(n): float(s) for n, s in zip(nums, sizes)},
    }
    if query is not None:
        facts["query"] = query.as_dict()
        facts["same_plane_reports"] = planes.get(query.plane, [])
        facts["same_type_reports"] = types.get(query.tumor_type, [])
    elif query_area_estimate_mm2 is not None:
        facts["query"] = {"area_mm2": float(query_area_estimate_mm2), "estimated": True}
    if "query" in facts:
        closest = int(np.argmin(np.abs(sizes - facts["query"]["area_mm2"])))
        facts["closest_size_report"] = nums[closest]
        facts["closest_size_mm2"] = float(sizes[closest])
    return facts


def grade_summary(text: str, truth: list) -> dict:
    """Accuracy and completeness of a summary on the 5 attributes of the reports ``truth``
    (size: min 0.25, max 0.25, mean 0.5), the paper's Fig. 4 grading."""
    f = compute_facts(truth)
    stated = sizes_mm2(text, ranges=True)

    def said(v: float) -> bool:
        return any(same_size(s, v) for s in stated)

    said_types, said_planes = types_mentioned(text), planes_mentioned(text)
    mentions = lambda pattern: re.search(pattern, text, re.I) is not None  # noqa: E731
    correct = {
        "modality": float(mentions(r"\bMRI\b|magnetic resonance")),
        "technique": float(mentions(r"\bT1") and mentions(r"contrast")),
        "tumor_type": float(said_types == set(f["tumor_types"])),
        "size": 0.25 * said(f["size_min_mm2"]) + 0.25 * said(f["size_max_mm2"]) + 0.5 * said(f["size_mean_mm2"]),
        "plane": float(said_planes == set(f["planes"])),
    }
    covered = {
        "modality": correct["modality"],
        "technique": float(mentions(r"\bT1|contrast")),
        "tumor_type": float(bool(said_types)),
        "size": float(bool(stated)),
        "plane": float(bool(said_planes)),
    }
    return {
        "accuracy": float(np.mean(list(correct.values()))),
        "completeness": float(np.mean(list(covered.values()))),
        "per_attribute": correct,
    }
