"""The query service behind the CLI, the HTTP API and the UI: one trained run loaded once
(encoder, archive index, NIR and KNN), answering image -> prediction + evidence."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from scipy.special import softmax

from .classify import KNNClassifier, NIRClassifier, nir_positions
from .data import CLASS_NAMES, CaseTable, load_cases
from .index import VectorIndex
from .store import deep_search, lookup
from .reports import cached_llm_reports, case_attributes, make_report
from .training import checkpoint_sha256, embed_images, load_top, trunk_descriptors

_MODEL_LOCK = threading.Lock()
DISCLAIMER = ("Decision support only, not a diagnosis: the prediction is derived from similar archive cases "
              "and must be reviewed by a qualified clinician.")


def _best_trial(run: Path) -> int:
    """The first trained trial (trials differ only by seed)."""
    trials = sorted(int(p.name.split("_")[1]) for p in run.glob("trial_*") if (p / "index.faiss").is_file())
    if not trials:
        raise FileNotFoundError(f"{run} has no trained trial with an index: run `neurocbir train --out {run}` first")
    return trials[0]


class RetrievalService:
    def __init__(self, run: Path | str, table: CaseTable | None = None, trial: int | None = None):
        sha = self._load_model(run, trial)
        cfg = json.loads((self.run / "config.json").read_text())
        self.table = table if table is not None else load_cases(cfg.get("data"))
        tdir = self.run / f"trial_{self.trial}"
        self.index = VectorIndex.load(tdir / "index.faiss", checkpoint_sha256=sha, dim=self.encoder.embedding_dim)
        emb = np.load(tdir / "embeddings.npz")
        self.archive_rows = emb["archive_rows"]
        if len(self.archive_rows) != len(self.index):
            raise ValueError(f"{tdir}: index and embeddings disagree on the archive size")
        self.example_rows = emb["test_rows"]
        labels = self.table.label[self.archive_rows]
        groups = self.table.patient_id[self.archive_rows]
        self.nir = NIRClassifier().fit(emb["archive"], labels, groups=groups)
        self.nir_dedup = NIRClassifier(one_per_patient=True).fit(emb["archive"], labels, groups=groups)
        self.knn = KNNClassifier(n_neighbors=7).fit(emb["archive"], labels, groups=groups)
        # "No similar case": farther from every archive case, in frozen-trunk feature space, than
        # (almost) every held-out test case was from its nearest archive case.
        archive_trunk, test_trunk = self._trunk_descriptors(emb)
        self.trunk_index = VectorIndex.build(archive_trunk) if archive_trunk is not None else None
        d, _ = (self.trunk_index.search(test_trunk, 1) if self.trunk_index is not None else self.index.search(emb["test"], 1))
        self.far_threshold = float(np.percentile(d[:, 0], 99.5) * 1.1)
        self.case_row = {int(i): r for r, i in enumerate(self.table.idx)}
        self.llm_reports = cached_llm_reports()

    def _load_model(self, run: Path | str, trial: int | None) -> str:
        """Encoder + trained top of a run's trial; returns the checkpoint's SHA-256."""
        self.run = Path(run)
        if not (self.run / "config.json").is_file():
            raise FileNotFoundError(f"{self.run} is not a run directory (no config.json)")
        self.trial = _best_trial(self.run) if trial is None else trial
        self.encoder, self.top, self.cfg = load_top(self.run, self.trial)
        return checkpoint_sha256(self.run, self.trial)

    def _trunk_descriptors(self, emb) -> tuple[np.ndarray | None, np.ndarray | None]:
        if "archive_trunk" in emb:
            return emb["archive_trunk"], emb["test_trunk"]
        # runs trained before descriptors were saved: take them from the feature cache if it is there
        from .features import cached_features

        cache = cached_features(self.table, self.encoder, [self.top.cut], n_copies=self.cfg.n_copies,
                                cache_dir=Path(self.cfg.cache_dir) if self.cfg.cache_dir else None, only_if_cached=True)
        if self.top.cut not in cache:
            return None, None
        f = cache[self.top.cut]
        return trunk_descriptors(f[self.archive_rows]), trunk_descriptors(f[self.example_rows])

    # --- embedding ----------------------------------------------------------------------
    def embed(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(embedding, trunk descriptor) of one image."""
        with _MODEL_LOCK:  # one forward pass at a time: torch already uses every core
            return embed_images(self.encoder, self.top, [image])

    # --- queries --------------------------------------------------------------------------
    @property
    def archive_size(self) -> int:
        return len(self.index)

    def _neighbours(self, q: np.ndarray, one_per_patient: bool) -> dict:
        """Distance-sorted archive case ids (after patient filtering) and the NIR / KNN outputs."""
        nir = self.nir_dedup if one_per_patient else self.nir
        dist, rows = nir.retrieve(q)
        valid = rows[0] >= 0
        proba = nir.predict_proba(q)[0]
        return {"distances": dist[0][valid], "case_ids": self.table.idx[self.archive_rows[rows[0][valid]]],
                "classes": nir.classes_, "proba": proba, "positions": nir.incorrect_positions(q)[0],
                "knn": dict(zip(self.knn.classes_, self.knn.predict_proba(q)[0]))}

    def _nearest_trunk(self, trunk: np.ndarray, nearest_embedding: float) -> float:
        return float(self.trunk_index.search(trunk, 1)[0][0, 0]) if self.trunk_index is not None else nearest_embedding

    def query(self, image: np.ndarray, k: int = 5, one_per_patient: bool = False) -> dict:
        if not 1 <= k <= 50:
            raise ValueError("k must be between 1 and 50")
        q, trunk = self.embed(image)
        n = self._neighbours(q, one_per_patient)
        classes, proba = n["classes"], n["proba"]
        winner = int(np.argmax(proba))
        info = self.describe([int(i) for i in n["case_ids"][:k]])
        retrievals = [{**info[int(i)], "distance": round(float(d), 4)} for d, i in zip(n["distances"][:k], n["case_ids"][:k])]
        nearest = self._nearest_trunk(trunk, float(n["distances"][0]))
        return {
            "prediction": CLASS_NAMES[int(classes[winner])],
            "confidence": round(float(proba[winner]), 4),
            "probabilities": {CLASS_NAMES[int(c)]: round(float(p), 4) for c, p in zip(classes, proba)},
            "nir_positions": {CLASS_NAMES[int(c)]: int(v) for c, v in zip(classes, n["positions"])},
            "knn_vote": {CLASS_NAMES[int(c)]: round(float(p), 4) for c, p in n["knn"].items()},
            "retrievals": retrievals,
            "no_similar_case": nearest > self.far_threshold,
            "nearest_distance": round(nearest, 4),
            "disclaimer": DISCLAIMER,
        }

    def describe(self, case_ids: list[int]) -> dict[int, dict]:
        """label / plane / area of archive cases, by case id."""
        out = {}
        for c in case_ids:
            row = self._row(c)
            out[c] = {"case_id": c, "label": CLASS_NAMES[int(self.table.label[row])],
                      "plane": str(self.table.plane[row]) or None, "area_mm2": round(float(self.table.area_mm2[row]), 2)}
        return out

    def case(self, case_id: int, style: str = "normal") -> dict:
        out = {**self.describe([case_id])[case_id], "in_archive": bool(np.isin(self._row(case_id), self.archive_rows))}
        out["report"] = self.reports([case_id], style)[0] if out["plane"] else None
        return out

    def reports(self, case_ids: list[int], style: str = "normal") -> list[str]:
        """Reports of archive cases; normal ones written by an LLM where `neurocbir write-reports`
        cached them, else by the offline paraphraser."""
        llm = self.llm_reports if style == "normal" else {}
        return [llm.get(c) or make_report(case_attributes(self.table, self._row(c)), style, c) for c in case_ids]

    def _row(self, case_id: int) -> int:
        if case_id not in self.case_row:
            raise KeyError(f"no case {case_id} (case ids run from {int(self.table.idx.min())} to {int(self.table.idx.max())})")
        return self.case_row[case_id]

    def case_image(self, case_id: int) -> np.ndarray:
        return self.table.load_image(self._row(case_id))

    def case_mask(self, case_id: int) -> np.ndarray:
        return self.table.load_mask(self._row(case_id))

    def examples(self, per_class: int = 4) -> list[dict]:
        rng = np.random.default_rng(0)
        out = []
        for c in range(len(CLASS_NAMES)):
            rows = self.example_rows[self.table.label[self.example_rows] == c]
            for r in rng.choice(rows, min(per_class, len(rows)), replace=False):
                out.append({"case_id": int(self.table.idx[r]), "label": CLASS_NAMES[c]})
        return out


class ArchiveService(RetrievalService):
    """The same service over a :class:`neurocbir.archive.CaseArchive` built with
    ``neurocbir add`` (SQLite + FAISS or Milvus): any number of cases, any source folder."""

    def __init__(self, run: Path | str, archive: Path | str, trial: int | None = None):
        from .archive import CaseArchive

        sha = self._load_model(run, trial)
        self.archive = CaseArchive.open(archive, checkpoint_sha256=sha, dim=self.encoder.embedding_dim)
        cols = self.archive.columns()
        if not len(cols["id"]):
            raise ValueError(f"the archive {archive} holds no cases: add some with `neurocbir add FOLDER --archive {archive}`")
        self.label_of = lookup(cols["id"], cols["label"])
        self.group_of = lookup(cols["id"], cols["patient_key"], missing="")
        self.classes = np.unique(cols["label"])
        trunk = self.archive.trunk_vectors()
        self.trunk_index = VectorIndex.build(trunk) if trunk is not None and len(trunk) == len(cols["id"]) else None
        self.far_threshold = self._far_threshold(cols)
        self.llm_reports = {}

    def _far_threshold(self, cols: dict) -> float:
        """Like the run's threshold, from leave-one-patient-out nearest distances inside the archive."""
        if self.trunk_index is None:
            return float("inf")
        sample = np.random.default_rng(0).choice(len(cols["id"]), min(2000, len(cols["id"])), replace=False)
        d, rows = self.trunk_index.search(self.trunk_index.index.reconstruct_batch(sample), min(50, len(cols["id"])))
        other = cols["patient_key"][rows] != cols["patient_key"][sample][:, None]
        nearest = np.where(other.any(1), d[np.arange(len(d)), np.argmax(other, 1)], np.nan)
        nearest = nearest[np.isfinite(nearest)]
        return float(np.percentile(nearest, 99.5) * 1.1) if len(nearest) else float("inf")

    @property
    def archive_size(self) -> int:
        return self.archive.store.count()

    def _neighbours(self, q: np.ndarray, one_per_patient: bool) -> dict:
        nc = int(self.classes.max()) + 1
        dist, ids, labels = deep_search(self.archive.store, self.label_of, q, nc, 1,
                                        self.group_of if one_per_patient else None)
        # classes absent from the archive get no column, as in the estimators
        pos = nir_positions(labels, nc)[0][self.classes]
        proba = softmax(pos.astype(float))
        valid = ids[0] >= 0
        top = labels[0][valid][:7]
        return {"distances": dist[0][valid], "case_ids": ids[0][valid], "classes": self.classes, "proba": proba,
                "positions": pos, "knn": {c: float((top == c).mean()) for c in self.classes}}

    def describe(self, case_ids: list[int]) -> dict[int, dict]:
        found = self.archive.cases(case_ids)
        missing = [c for c in case_ids if c not in found]
        if missing:
            raise KeyError(f"no case {missing[0]} in the archive")
        return {c: {k: found[c][k] for k in ("case_id", "label", "plane", "area_mm2")} for c in case_ids}

    def case(self, case_id: int, style: str = "normal") -> dict:
        stored = self._stored(case_id)
        out = {k: stored[k] for k in ("case_id", "label", "plane", "area_mm2")} | {"in_archive": True}
        writable = stored["report"] or (stored["plane"] and stored["area_mm2"] is not None)
        out["report"] = self.reports([case_id], style)[0] if writable else None
        return out

    def reports(self, case_ids: list[int], style: str = "normal") -> list[str]:
        """The report stored with the case (from cases.csv), else one written from its attributes."""
        from .reports import ReportAttributes

        found = self.archive.cases(case_ids)
        out = []
        for c in case_ids:
            if c not in found:
                raise KeyError(f"no case {c} in the archive")
            r = found[c]
            if r["report"]:
                out.append(r["report"])
            elif r["plane"] and r["area_mm2"] is not None:
                out.append(make_report(ReportAttributes(r["label"], r["plane"], r["area_mm2"]), style, c))
            else:
                raise KeyError(f"case {c} has no report and no plane/size to write one from")
        return out

    def case_image(self, case_id: int) -> np.ndarray:
        from .uploads import UploadError, read_scan

        path = Path(self._stored(case_id)["image_path"])
        try:
            return read_scan(path.read_bytes(), path.name)
        except (OSError, UploadError) as exc:
            raise KeyError(f"the image of case {case_id} cannot be read ({exc})") from None

    def case_mask(self, case_id: int) -> np.ndarray:
        """The tumor mask where the source layout has one (bundled masks/ or the .mat file)."""
        from .data import FigshareSource, FolderSource

        path = Path(self._stored(case_id)["image_path"])
        try:
            if path.suffix == ".mat":
                return FigshareSource(path.parent).load_mask(int(path.stem))
            if path.parent.name == "images" and (path.parent.parent / "masks" / f"{path.stem}.png").is_file():
                return FolderSource(path.parent.parent).load_mask(int(path.stem))
        except (ValueError, OSError):
            pass
        raise KeyError(f"case {case_id} has no tumor mask")

    def _stored(self, case_id: int) -> dict:
        found = self.archive.cases([case_id])
        if case_id not in found:
            raise KeyError(f"no case {case_id} in the archive")
        return found[case_id]

    def examples(self, per_class: int = 4) -> list[dict]:
        return []  # archive cases would only find themselves; the user uploads scans
