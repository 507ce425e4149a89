"""A case archive as the app serves it: :class:`ArchiveCases`, searched through the archive's
FAISS or Milvus store, following what `neurocbir add` and `remove` commit while it serves."""

from __future__ import annotations

import copy
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from neurocbir.classify.presence import fit_presence
from neurocbir.data.cases import CLASS_NAMES, NO_TUMOR, NO_TUMOR_LABEL, mask_for_image
from neurocbir.errors import InvalidInput
from neurocbir.reports.text import ReportAttributes, make_report
from neurocbir.retrieval import start_file
from neurocbir.retrieval.duplicates import DuplicateIndex
from neurocbir.retrieval.examples import find_example, list_examples
from neurocbir.retrieval.index import VectorIndex
from neurocbir.retrieval.store import group_keys, lookup
from neurocbir.serving.sources import SearchedCases

#: an archive view grown by more than this share of the cases it loaded is loaded afresh
REGROW_SHARE = 0.1


def _code(codes: dict[str, int], keys: np.ndarray) -> np.ndarray:
    """Each patient key's number (int32), new keys numbered as they come (``codes`` grows: views
    made from one another share it, and a number never changes)."""
    uniq, inverse = np.unique(keys, return_inverse=True)
    numbers = np.array([codes.setdefault(str(k), len(codes)) for k in uniq], dtype=np.int32)
    return numbers[inverse]


class _Phases:
    """Seconds since the last call, by phase: ``clock("what just ended")``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase], self._last = round(now - self._last, 1), now


class ArchiveCases(SearchedCases):
    """A :class:`neurocbir.retrieval.archive.CaseArchive` built with ``neurocbir add``: any number of
    cases from any source folder, searched through its FAISS or Milvus store."""

    partitioned = True

    def __init__(self, root: Path | str, checkpoint_sha256: str, dim: int, store_wait_s: float | None = None):
        from neurocbir.retrieval.archive import CaseArchive

        self.root, self.checkpoint_sha256, self.dim = Path(root), checkpoint_sha256, dim
        self.store_wait_s = store_wait_s
        clock = _Phases()  # where a load's seconds go (load_seconds: the operator is told at start)
        self.archive = CaseArchive.open(
            root, checkpoint_sha256=checkpoint_sha256, dim=dim, writer=False, store_wait_s=store_wait_s
        )
        self.version = self.archive.opened_version  # what this view holds (see changed())
        clock("store opened")
        self._codes: dict[str, int] = {}  # patient key -> a number: a million 32-character keys are 130 MB
        cols = self.archive.columns(lambda keys: _code(self._codes, keys))
        if not len(cols["id"]):
            raise InvalidInput(
                f"the archive {root} holds no cases: add some with `neurocbir add FOLDER --archive {root}`"
            )
        self.store = self.archive.store
        self.store_ids, self.attr_label = cols["id"], cols["label"]  # what the retrieval filters read
        self.attr_plane, self.attr_area = cols["plane"], cols["area_mm2"]
        self._patient_keys = cols["patient_key"]
        self.loaded_size = len(cols["id"])  # at the last full load (see grown)
        if not (cols["label"] < len(CLASS_NAMES)).any():
            raise InvalidInput(f"the archive {root} holds no tumor cases, only slices without a tumor: add some")
        self._set_lookups()
        clock("case columns read")
        # "no similar case" and presence read the trunk descriptors of at most TRUNK_SAMPLE cases
        # (all of an archive that size): memory that does not grow with the archive. A large
        # archive keeps them, and its prints' index, in a start file (a few large reads)
        kept = start_file.read(self.archive)
        sample = self.archive.trunk_sample(start_file.TRUNK_SAMPLE) if kept is None else kept[0]
        clock("trunk sample read" if kept is None else "start file read (trunk sample, prints)")
        # the three parts of a load that take seconds run side by side: the presence model's fit
        # (libsvm) and the prints' inverted file (FAISS) let go of the GIL while they compute
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="archive-load") as pool:
            # presence: every sampled case with a tumor (of a known type or not) against those without
            presence = pool.submit(
                fit_presence,
                None if sample is None else sample["trunk"],
                cols["label"] != NO_TUMOR_LABEL if sample is None else sample["label"] != NO_TUMOR_LABEL,
            )
            prints = pool.submit(DuplicateIndex.of_archive, self.archive) if kept is None else None
            self.trunk_index = VectorIndex.build(sample["trunk"], half=True) if sample is not None else None
            self.far_threshold = self._far_threshold(np.array([]) if sample is None else sample["patient_key"])
            clock("'no similar case' index built")
            self.presence = presence.result()
            clock("presence fitted (beside it)")
            self.duplicate_index = kept[1] if prints is None else prints.result()
            if prints is not None:
                clock("prints indexed (beside it)")
        self.load_seconds = clock.seconds

    def changed(self) -> bool:
        """Has `neurocbir add` or `remove` changed the archive since this view was loaded?"""
        return self.archive.data_version() != self.version

    def grown(self) -> ArchiveCases | None:
        """This view and the cases `neurocbir add` committed since it loaded, the others not read
        again (their labels, vectors and prints are shared, copied only where new ones join them);
        None when a case was removed, or the archive grew by more than :data:`REGROW_SHARE` since
        its last full load: then :meth:`reopened`. Until that full load, the presence model and
        the "no similar case" reference stay those of the last one."""
        from neurocbir.retrieval.duplicates import SIDE
        from neurocbir.retrieval.store import FaissStore

        version = self.archive.data_version()  # before reading: a commit meanwhile counts as a change
        new, kept = self.archive.indexed_after(int(self.store_ids.max()), SIDE * SIDE)
        grown_by = len(self.store_ids) + len(new["id"]) - self.loaded_size
        if kept != len(self.store_ids) or grown_by > REGROW_SHARE * self.loaded_size:
            return None
        view = copy.copy(self)
        view.version = view.archive.opened_version = version
        for cached in ("_sorted_areas", "_area_of"):
            view.__dict__.pop(cached, None)
        if not len(new["id"]):
            return view
        ids = new["id"]
        view.store_ids = np.concatenate([self.store_ids, ids])
        view.attr_label = np.concatenate([self.attr_label, new["label"]])
        view.attr_plane = np.concatenate([self.attr_plane, new["plane"]])
        view.attr_area = np.concatenate([self.attr_area, new["area_mm2"]])
        view._patient_keys = np.concatenate([self._patient_keys, _code(self._codes, new["patient_key"])])
        view._set_lookups()
        if isinstance(self.store, FaissStore):  # a Milvus server holds them already
            view.store = self.store.with_added(ids, new["embedding"], group_keys(new["label"], new["plane"]))
        else:  # its count and partitions as the server has them now, not as cached a moment ago
            self.store.reread()
        printed = np.isfinite(new["fingerprint"]).all(1)
        if self.duplicate_index is not None and printed.any():
            view.duplicate_index = self.duplicate_index.with_added(ids[printed], new["fingerprint"][printed])
        return view

    def _set_lookups(self) -> None:
        """Labels and patients by store id, and the tumor types present, from the case columns."""
        ids, labels = self.store_ids, self.attr_label
        tumor = labels < len(CLASS_NAMES)  # typed tumor cases: the only tumor-type evidence
        self.label_of = lookup(ids, np.where(tumor, labels, -1))  # NIR skips the others
        self.any_label_of = lookup(ids, labels)
        self.group_of = lookup(ids, self._patient_keys)  # -1: not a case of this view
        self.classes = np.unique(labels[tumor])

    def reopened(self) -> ArchiveCases:
        """A new view of the archive as it is now (this one stays usable meanwhile)."""
        return ArchiveCases(self.root, self.checkpoint_sha256, self.dim, self.store_wait_s)

    def _stored(self, case_ids: list[int]) -> dict[int, dict]:
        found = self.archive.cases(case_ids)
        for c in case_ids:
            if c not in found and (example := find_example(self.archive, c)) is not None:
                found[c] = {**example, "plane": None, "area_mm2": None, "report": None, "example": True}
        missing = [c for c in case_ids if c not in found]
        if missing:
            raise KeyError(f"no case {missing[0]} in the archive")
        return found

    def describe(self, case_ids: list[int]) -> dict[int, dict]:
        found = self._stored(case_ids)
        return {c: {k: found[c][k] for k in ("case_id", "label", "plane", "area_mm2")} for c in case_ids}

    def case(self, case_id: int, style: str = "normal") -> dict:
        stored = self._stored([case_id])[case_id]
        out = {k: stored[k] for k in ("case_id", "label", "plane", "area_mm2")} | {
            "in_archive": "example" not in stored
        }
        out["report"] = self.reports([case_id], style)[0]
        return out

    def reports(self, case_ids: list[int], style: str = "normal") -> list[str | None]:
        """The report stored with the case (from cases.csv), else one written from its plane and
        size; None for a case with neither (no tumor, or another hospital's slice recorded without
        them). KeyError for a case the archive does not hold."""
        found = self._stored(case_ids)
        out = []
        for c in case_ids:
            r = found[c]
            if r["report"]:
                out.append(r["report"])
            elif r["label"] != NO_TUMOR and r["plane"] and r["area_mm2"] is not None:
                out.append(make_report(ReportAttributes(r["label"], r["plane"], r["area_mm2"]), style, c))
            else:
                out.append(None)
        return out

    def image(self, case_id: int) -> np.ndarray:
        from neurocbir.data.uploads import read_scan

        path = Path(self._stored([case_id])[case_id]["image_path"])
        try:
            if path.suffix == ".npy":  # the header-free copy of a slice ingested from a PACS
                return np.load(path, allow_pickle=False).astype(np.float32)
            return read_scan(path.read_bytes(), path.name)
        except (OSError, ValueError) as exc:  # UploadError is a ValueError, as is a corrupt .npy
            raise KeyError(f"the image of case {case_id} cannot be read ({exc})") from None

    def mask(self, case_id: int) -> np.ndarray:
        """The tumor mask where the source layout has one (bundled masks/ or the .mat file)."""
        mask = mask_for_image(self._stored([case_id])[case_id]["image_path"])
        if mask is None:
            raise KeyError(f"case {case_id} has no tumor mask")
        return mask

    def examples(self, per_class: int = 4) -> list[dict]:
        """The held-out examples stored beside the archive (`neurocbir add --examples`), a few per
        label; none unless some were added (an archive case would only find itself)."""
        return list_examples(self.archive, per_class)
