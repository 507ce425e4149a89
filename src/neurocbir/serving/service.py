"""The query service behind the CLI, the HTTP API and the UI: one trained model and one case
source (the run's own index, or a case archive), answering image -> prediction + evidence.

One query is one CNN pass and one search: NIR, its I_c positions and the KNN vote are all
scored from the same neighbour list (:mod:`neurocbir.classify.neighbors`). The probabilities shown are
NIR's, calibrated on training patients, with a conformal prediction set
(:mod:`neurocbir.classify.calibration`); runs trained before calibration show ``softmax(I_c)`` and
say ``"calibrated": false``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import Future
from dataclasses import asdict
from pathlib import Path

import numpy as np
from scipy.special import softmax

from neurocbir.classify import calibration
from neurocbir.classify import reach as evidence_reach
from neurocbir.classify import region as region_search
from neurocbir.classify import study as study_calibration
from neurocbir.classify.neighbors import knn_votes, nir_positions
from neurocbir.classify.presence import load_rule
from neurocbir.data.cases import CLASS_NAMES, CaseTable
from neurocbir.data.regions import Region, RegionError, region_on_grid, region_peak
from neurocbir.errors import InvalidInput, Unavailable
from neurocbir.models.cpu_runtime import backend
from neurocbir.models.inference import LesionModel, Model, load_model
from neurocbir.models.lesion import tumor_level, tumor_outline
from neurocbir.models.runs import first_weights, trial_dir
from neurocbir.retrieval.duplicates import Duplicate, ImagePrints
from neurocbir.retrieval.store import StoreUnavailable
from neurocbir.serving.archive_cases import ArchiveCases
from neurocbir.serving.feedback import FILE as FEEDBACK_FILE
from neurocbir.serving.feedback import FeedbackStore, fingerprint
from neurocbir.serving.sources import CaseFilter, CaseSource, RunCases
from neurocbir.serving.threads import one_blas_thread, one_thread, side_work
from neurocbir.serving.wording import DISCLAIMER, NO_TYPE, REGION_NO_TUMOR_NOTE, distant_evidence, uncertain_presence

log = logging.getLogger(__name__)


KNN_K = 7  # the KNN vote shown beside NIR, for comparison
RELOAD_WAIT_S = 2.0  # how long a query waits for a changed archive's new view (see refresh_cases)
#: the longest a query that needs the new view (a case removed under it) waits before a 503
RELOAD_MAX_WAIT_S = 10.0
#: on a vector store server, the slice's tumor presence is decided while the server searches
#: (benchmarks/query_stages.py measures it against after the search)
PRESENCE_BESIDE_SEARCH = True


class ArchiveUnavailable(Unavailable):
    """The served archive changed into one that cannot be served (e.g. every case removed)."""


class RetrievalService:
    """A model and a case source. Build it with :meth:`from_run` or :meth:`from_archive`;
    what is known about archive cases (attributes, reports, images) comes from ``cases``."""

    def __init__(self, model: Model | LesionModel, cases: CaseSource, feedback_path: Path | None = None):
        """``feedback_path``: the clinicians' feedback database (default: ``feedback.db`` in
        the run folder, or in the archive folder when serving an archive)."""
        self.model, self.cases = model, cases
        self.calibrator = (calibration.load(model.run) or {}).get("nir")
        self.tumor_level = tumor_level(model.run)
        self.region_search = region_search.load(model.run, self.tumor_level)
        self.presence_rule = load_rule(model.run)
        self.study_calibrator = study_calibration.load(model.run)
        self.reach = evidence_reach.load(model.run)  # whole-slice searches' 'no close tumor case'
        self.nir_read = calibration.read_depth(self.calibrator, self.region_search.calibrator, self.study_calibrator)
        self.feedback_path = Path(feedback_path) if feedback_path else Path(model.run) / FEEDBACK_FILE
        self._feedback: FeedbackStore | None = None
        self._feedback_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._reloading: threading.Thread | None = None
        self._unservable: str | None = None  # why the archive's latest state could not be loaded
        # PyTorch already spreads one forward pass over every core: its passes take turns; the
        # OpenVINO runtime gives each thread its own request, so its passes need no lock
        self.inference_lock = threading.Lock() if backend() == "torch" else contextlib.nullcontext()
        self._store_down: str | None = None  # why the vector store's server did not answer, last asked
        one_blas_thread()

    @property
    def feedback(self) -> FeedbackStore:
        """Opened on first use: serving alone writes nothing."""
        with self._feedback_lock:  # not the model's lock: a mark need not wait for a forward pass
            if self._feedback is None:
                self._feedback = FeedbackStore(self.feedback_path)
            return self._feedback

    @classmethod
    def from_run(cls, run: Path | str, trial: int | None = None, table: CaseTable | None = None) -> RetrievalService:
        """Serve a run's trial over the run's own archive (its training folds)."""
        model = load_model(run, trial)
        cases = RunCases(
            trial_dir(run, model.trial), model.checkpoint_sha256, model.embedding_dim, table, data=model.config.data
        )
        return cls(model, cases)

    @classmethod
    def from_archive(
        cls, run: Path | str, archive: Path | str, trial: int | None = None, store_wait_s: float | None = None
    ) -> RetrievalService:
        """Serve a run's trial over a case archive built with ``neurocbir add`` by that trial (by
        default the first trial with weights: an archive needs no index of the run's own);
        ``store_wait_s``: how long to wait for its Milvus server at start."""
        model = load_model(run, first_weights(run) if trial is None else trial)
        cases = ArchiveCases(archive, model.checkpoint_sha256, model.embedding_dim, store_wait_s)
        return cls(model, cases, feedback_path=Path(archive) / FEEDBACK_FILE)

    @property
    def run(self) -> Path:
        return self.model.run

    @property
    def trial(self) -> int:
        return self.model.trial

    @property
    def archive_size(self) -> int:
        """Cases the answers read (0 while the archive's latest state cannot be served)."""
        self.refresh_cases()  # not waited for: /health answers at once
        if self._unservable:
            return 0
        try:
            size, self._store_down = self.cases.size(), None
        except StoreUnavailable as exc:  # a vector store server down: said, served again once it is back
            size, self._store_down = 0, str(exc)
        return size

    @property
    def archive_problem(self) -> str | None:
        """Why the archive, as it is now, cannot be served (None when it can)."""
        return self._unservable or self._store_down

    def refresh_cases(self, wait_s: float | None = 0.0) -> bool:
        """Pick up what `neurocbir add` or `remove` committed to the served archive since its view
        was loaded: a new view (the old one and the added cases, or, after a removal, the archive
        read again) loads in a background thread and replaces the old one when ready.
        Waits at most ``wait_s`` seconds for it (None: until it serves); a query that comes sooner
        reads the previous view. Returns whether the archive had changed. A run's own index never
        changes."""
        cases = self.cases
        if not isinstance(cases, ArchiveCases) or not cases.changed():
            return False
        with self._reload_lock:
            if self._reloading is None or not self._reloading.is_alive():
                self._reloading = threading.Thread(target=self._reload, args=(cases,), name="archive-reload")
                self._reloading.daemon = True
                self._reloading.start()
            thread = self._reloading
        if wait_s is None or wait_s > 0:
            thread.join(wait_s)
        return True

    def _fresh_cases(self) -> CaseSource | None:
        """The archive's view as it is now, for a query that met a case removed under it: waited for
        at most :data:`RELOAD_MAX_WAIT_S` (a 503 that says so, then: the reload goes on); None when
        the archive has not changed."""
        if not self.refresh_cases(wait_s=RELOAD_MAX_WAIT_S):
            if self._unservable:
                raise ArchiveUnavailable(self._unservable)
            return None
        thread = self._reloading
        if thread is not None and thread.is_alive():
            raise ArchiveUnavailable(
                f"the case archive changed and its new view is still loading after {RELOAD_MAX_WAIT_S:.0f} s: "
                "ask again in a moment"
            )
        if self._unservable:
            raise ArchiveUnavailable(self._unservable)
        return self.cases

    def _reload(self, old: ArchiveCases) -> None:
        version = old.archive.data_version()
        try:
            # cases only added: the new ones join this view (no full reload); else the archive is read again
            self.cases, self._unservable = old.grown() or old.reopened(), None
        except (ValueError, OSError, StoreUnavailable) as exc:  # e.g. every case removed: keep the last view, say why
            self._unservable = f"the case archive changed and cannot be served: {exc}"
            log.warning("%s; serving its previous view", self._unservable)
            old.version = version  # not tried again until the archive changes again

    def region_grid(self, image: np.ndarray, region: Region) -> np.ndarray:
        """The region on the network's input grid (checked against the scan and the model)."""
        if not isinstance(self.model, LesionModel):
            raise InvalidInput("the served model has no tumor decoder: it cannot search by a drawn region")
        if region.mask.shape != tuple(image.shape[:2]):
            rows, cols = image.shape[:2]
            raise RegionError(
                f"the region was drawn on a {region.mask.shape[1]} x {region.mask.shape[0]} image; the scan is {cols} x {rows}"
            )
        return region_on_grid(region, self.model.input_size)

    def analyse(self, image: np.ndarray, grid: np.ndarray | None = None, presence: bool = False) -> tuple:
        """(embedding, trunk descriptor, tumor probability map or None) of one image; ``grid``:
        a region to search by, on the input grid (:meth:`region_grid`); ``presence``: and the
        tumor presence map (``LesionModel.analyse_batch``) or None."""
        with self.inference_lock:
            found = self.model.analyse_batch([image], *([] if grid is None else [[grid]]), presence=True)
        (q, trunk, probs, shown), one = found, lambda v: None if v is None else v[0]
        return (q, trunk, one(probs), one(shown)) if presence else (q, trunk, one(probs))

    @one_thread
    def query(
        self,
        image: np.ndarray,
        k: int = 5,
        one_per_patient: bool = False,
        coverage: float = calibration.DEFAULT_COVERAGE,
        pixel_spacing_mm: tuple[float, float] | None = None,
        rerank: bool = False,
        filters: CaseFilter | None = None,
        region: Region | None = None,
    ) -> dict:
        """Prediction, calibrated confidence, prediction set and the evidence for one scan,
        and its predicted tumor outline where the model has a tumor decoder (``pixel_spacing_mm``:
        the scan's (row, column) spacing, if known, for the area). ``rerank``: order the shown
        retrievals by clinicians' feedback (among the nearest max(2k, 20); the prediction is not
        changed by it). ``filters``: show only archive cases of a plane, type or size range
        (searched inside the vector store; the prediction still reads the whole archive).
        ``region``: search by this drawn region of the scan (:mod:`neurocbir.classify.region`):
        the embedding pools over it, presence and calibration are the region search's."""
        if not 1 <= k <= 50:
            raise InvalidInput("k must be between 1 and 50")
        if not 0.5 <= coverage < 1:
            raise InvalidInput("coverage must be at least 0.5 and below 1 (e.g. 0.95)")
        grid = None if region is None else self.region_grid(image, region)
        # is the scan already in the archive? checked on the other core while the CNN runs
        own = side_work().submit(_own_cases, self.cases, image)
        q, trunk, tumor_prob, shown = self.analyse(image, grid, presence=True)
        peak, in_region = None if shown is None else (float(shown.max()), float(tumor_prob.max())), None
        if grid is not None:  # the decoder's map the run's region search was fitted on
            rs, seen = self.region_search, shown if self.region_search.decoder == "presence" else tumor_prob
            in_region = region_search.presence(region_peak(seen, grid), rs.threshold, float(seen.max()), rs.decoder)
        # an archive changed by `add` / `remove` since its view loaded: a view of a small one loads
        # within this wait, so the answer reads the archive as it is; a large one's loads meanwhile
        self.refresh_cases(wait_s=RELOAD_WAIT_S)
        search = (q, trunk, own, k, one_per_patient, coverage, rerank, filters, None, in_region, peak)
        try:
            evidence = self._evidence(self.cases, *search)
            self._store_down = None
        except StoreUnavailable as exc:
            self._store_down = str(exc)
            raise ArchiveUnavailable(f"{exc}; the app serves again once it is back") from None
        except KeyError:  # a retrieval removed since this view loaded: the evidence is read again
            fresh = self._fresh_cases()
            if fresh is None:
                raise
            evidence = self._evidence(fresh, *search)
        # the slice's own outline is context for a region search, whatever the region holds
        outline = (region is not None or evidence["tumor_found"] is not False) and tumor_prob is not None
        return {
            **evidence,
            "image_size": [int(image.shape[0]), int(image.shape[1])],  # rows, columns: what a region is drawn in
            "region": None if region is None else self._region_answer(region),
            "query_fingerprint": fingerprint(image),
            "query_tumor": tumor_outline(tumor_prob, image.shape[:2], pixel_spacing_mm, self.tumor_level)
            if outline
            else None,
            "tumor_outlining": tumor_prob is not None,  # does this model outline tumors at all?
            "disclaimer": DISCLAIMER,
        }

    def _evidence(
        self,
        cases: CaseSource,
        q: np.ndarray,
        trunk: np.ndarray,
        own: list[Duplicate] | ImagePrints | Future,
        k: int,
        one_per_patient: bool,
        coverage: float,
        rerank: bool,
        filters: CaseFilter | None,
        neighbours: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        in_region: tuple[bool, dict] | None = None,
        peak: tuple[float, float] | None = None,
    ) -> dict:
        """The prediction and its evidence from one view of the cases (one search, one NIR;
        ``neighbours``: that search's (distances, case ids, labels), where the caller has it;
        ``in_region``: a region search's presence answer, which replaces the slice's (found None: the
        slice's answer decides, :func:`neurocbir.classify.region.presence`); ``peak``: the highest
        probability on the slice of the decoder the run's presence rule reads, and of the tumor decoder).
        ``own``: the cases that are the scan itself (:meth:`CaseSource.duplicates_of`), or the
        scan's prints to find them with (here, while a vector store server searches), or the
        :func:`_own_cases` begun for the scan: shown, marked, and not counted as evidence."""
        remote = neighbours is None and getattr(getattr(cases, "store", None), "remote", False)
        # a vector store server searches while this thread checks the scan against the archive here
        searching = side_work().submit(cases.neighbours, q, one_per_patient, self.nir_read) if remote else None
        if isinstance(own, Future):  # begun on another view of the cases: checked again on this one
            checked, prints, found = own.result()
            own = found if checked is cases and found is not None else prints
        own = cases.duplicates_of(own) if isinstance(own, ImagePrints) else own
        nearest = cases.nearest_trunk(trunk)
        # the slice's presence (where the answer reads it) needs no neighbour: decided while a server searches
        needed, on_slice = in_region is None or in_region[0] is None, None
        if needed and searching is not None and PRESENCE_BESIDE_SEARCH:
            on_slice = self.presence_rule.decide(cases.tumor_presence(trunk), *(peak or (None,)))
        if neighbours is None and searching is not None:
            neighbours = searching.result()
        dist, case_ids, labels = neighbours or cases.neighbours(q, one_per_patient, self.nir_read)
        own_ids = {d.case_id for d in own}
        shown_dist, shown_ids = dist, case_ids
        keep = ~np.isin(case_ids, list(own_ids))
        if own_ids and keep.any():  # the scan itself is no independent evidence: NIR, KNN and the set read the others
            dist, case_ids, labels = dist[keep], case_ids[keep], labels[keep]
        classes = cases.classes  # classes absent from the archive get no column
        positions = nir_positions(labels[None], len(CLASS_NAMES))[0][classes]
        cal = self.calibrator
        if in_region is not None and self.region_search.calibrator is not None:
            cal = self.region_search.calibrator
        if cal is not None:  # the same logits the calibration was fitted on
            proba = cal.proba(
                calibration.neighbour_logits("nir", labels[None], len(CLASS_NAMES), cal.depth)[0][classes]
            )
        else:
            proba = softmax(positions.astype(float))
        knn = knn_votes(labels[None], len(CLASS_NAMES), KNN_K)[0][classes]
        winner = int(np.argmax(proba))
        in_set = cal.prediction_set(proba, coverage)[0] if cal is not None else None
        disagree = bool(int(np.argmax(knn)) != winner or (in_set is not None and in_set.sum() > 1))
        nearest = float(dist[0]) if nearest is None else nearest
        far = nearest > cases.far_threshold
        distant = None if self.reach is None or in_region is not None else self.reach.check(dist)
        distant = distant and {**distant, "warning": distant_evidence(distant)}
        if (far or distant) and in_set is not None:
            # calibration and coverage hold for scans like the calibration queries: else no class is ruled out
            in_set = np.ones_like(in_set)
        filtering = filters is not None and filters.active()
        pool_dist, pool_ids = (
            cases.filtered(q, filters, max(2 * k, 20) if rerank else k, one_per_patient)
            if filtering
            else (shown_dist, shown_ids)
        )
        shown = np.arange(min(k, len(pool_ids)))
        if rerank:
            pool = min(max(2 * k, 20), len(pool_ids))
            shown = self.feedback.rerank(pool_ids[:pool], pool_dist[:pool])[:k]
        info = cases.describe([int(pool_ids[j]) for j in shown])
        retrievals = [
            {
                **info[int(pool_ids[j])],
                "distance": round(float(pool_dist[j]), 4),
                "rank": int(j) + 1,
                "same_image_as_query": int(pool_ids[j]) in own_ids,
            }
            for j in shown
        ]
        already = {"already_in_archive": asdict(own[0]) if own else None}
        names = [CLASS_NAMES[int(c)] for c in classes]
        other = np.flatnonzero(labels != classes[winner])  # contrastive evidence: the nearest case that is not
        nearest_other = (
            {
                "case_id": int(case_ids[other[0]]),
                "label": CLASS_NAMES[int(labels[other[0]])],
                "distance": round(float(dist[other[0]]), 4),
                "rank": int(other[0]) + 1,
            }
            if len(other)
            else None
        )
        if needed and on_slice is None:
            on_slice = self.presence_rule.decide(cases.tumor_presence(trunk), *(peak or (None,)))
        found, presence = on_slice if in_region is None else in_region
        if in_region is not None and found is None:  # the decoder locates no tumor: the slice's answer decides
            found, presence = on_slice[0], {**presence, "on_slice": on_slice[1]}
        if found is False:  # no tumor type is asserted; the nearest cases, of any label, are context
            dist, ids = cases.nearest(q, k)
            info = cases.describe([int(c) for c in ids])
            shown = [
                {
                    **info[int(c)],
                    "distance": round(float(d), 4),
                    "rank": j + 1,
                    "same_image_as_query": int(c) in own_ids,
                }
                for j, (d, c) in enumerate(zip(dist, ids))
            ]
            return {
                **NO_TYPE,
                **({"note": REGION_NO_TUMOR_NOTE} if in_region is not None else {}),
                **already,
                "tumor_found": False,
                "tumor_presence": presence,
                "retrievals": shown,
                "reranked_by_feedback": False,
                "filters": None,
                "no_similar_case": far,
                "nearest_distance": round(nearest, 4),
            }
        conflict = next((e for e in (presence, presence.get("on_slice") or {}) if e.get("uncertain")), None)
        return {
            **already,
            "tumor_found": found,
            "tumor_presence": presence,
            "presence_warning": None if conflict is None else uncertain_presence(conflict),
            "prediction": names[winner],
            "confidence": round(float(proba[winner]), 4),
            "calibrated": cal is not None,
            # False for no similar case, or no close tumor case: the confidence is then no calibrated probability
            "calibration_applies": cal is not None and not far and distant is None,
            "probabilities": {n: round(float(p), 4) for n, p in zip(names, proba)},
            "prediction_set": None if in_set is None else [n for n, keep in zip(names, in_set) if keep],
            "coverage": coverage if cal is not None else None,
            "neighbours_disagree": disagree,
            "nir_positions": {n: int(v) for n, v in zip(names, positions)},
            "knn_vote": {n: round(float(p), 4) for n, p in zip(names, knn)},
            "retrievals": retrievals,
            "reranked_by_feedback": rerank,
            "filters": asdict(filters) if filtering else None,
            "nearest_other_class": nearest_other,
            "no_similar_case": far,
            "nearest_distance": round(nearest, 4),
            "no_close_tumor_case": distant,
        }

    def _region_answer(self, region: Region) -> dict:
        rs = self.region_search
        return {
            **region.as_dict(),
            "searched_by": "region",
            "calibration": "fitted on region searches" if rs.calibrator is not None else "the whole-slice calibration",
            "how": rs.how,
        }

    def similarity(
        self, image: np.ndarray, case_id: int, side: str = "query", region: Region | None = None
    ) -> tuple[np.ndarray, float | None]:
        """Similarity map (H, W, in [0, 1]) between a query scan and archive case ``case_id``:
        over the query (``side="query"``: what in the query looks like the case) or over the
        case (``side="case"``), and how much of the similarity is the tumor's (None for a model
        without a tumor map). See :func:`neurocbir.models.saliency.explain_similarity`."""
        from neurocbir.models.saliency import explain_similarity

        if side not in ("query", "case"):
            raise InvalidInput("side must be 'query' or 'case'")
        self.refresh_cases()
        grid = None if region is None else self.region_grid(image, region)  # the query searched by a region
        case_image = self.cases.image(case_id)  # KeyError for an unknown case
        with self.inference_lock:
            if side == "query":
                return explain_similarity(self.model, image, case_image, region=grid)
            return explain_similarity(self.model, case_image, image, other_region=grid)


@one_thread
def _own_cases(cases: CaseSource, image: np.ndarray) -> tuple[CaseSource, ImagePrints, list[Duplicate] | None]:
    """(``cases``, the scan's prints, the cases of ``cases`` that are the scan itself; None where
    a case left ``cases`` meanwhile: the answer's view checks it again)."""
    prints = ImagePrints(image)
    try:
        return cases, prints, cases.duplicates_of(prints)
    except KeyError:
        return cases, prints, None
