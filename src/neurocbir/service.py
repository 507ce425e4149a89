"""The query service behind the CLI, the HTTP API and the UI: one trained run loaded once
(encoder, archive index, NIR and KNN), answering image -> prediction + evidence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .classify import KNNClassifier, NIRClassifier
from .data import CLASS_NAMES, CaseTable, load_cases
from .index import VectorIndex
from .reports import cached_llm_reports, case_attributes, make_report
from .training import load_top, trunk_descriptors
from .transforms import preprocess

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
        import hashlib

        self.run = Path(run)
        if not (self.run / "config.json").is_file():
            raise FileNotFoundError(f"{self.run} is not a run directory (no config.json)")
        cfg = json.loads((self.run / "config.json").read_text())
        self.table = table if table is not None else load_cases(cfg.get("data"))
        self.trial = _best_trial(self.run) if trial is None else trial
        tdir = self.run / f"trial_{self.trial}"
        self.encoder, self.top, self.cfg = load_top(self.run, self.trial)
        sha = hashlib.sha256((tdir / "checkpoint.pt").read_bytes()).hexdigest()
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
        x = preprocess(image)[None]
        with torch.inference_mode():
            feat = self.encoder.forward_stages(x, 0, self.top.cut)
            return self.top(feat).numpy(), trunk_descriptors(feat.numpy()[:, None])

    # --- queries --------------------------------------------------------------------------
    def query(self, image: np.ndarray, k: int = 5, one_per_patient: bool = False) -> dict:
        if not 1 <= k <= 50:
            raise ValueError("k must be between 1 and 50")
        q, trunk = self.embed(image)
        nir = self.nir_dedup if one_per_patient else self.nir
        dist, ids = nir.retrieve(q)
        proba = nir.predict_proba(q)[0]
        positions = nir.incorrect_positions(q)[0]
        winner = int(np.argmax(proba))
        knn = self.knn.predict_proba(q)[0]
        retrievals = []
        for d, i in zip(dist[0], ids[0]):
            if i < 0 or len(retrievals) == k:
                break
            row = int(self.archive_rows[i])
            retrievals.append({"case_id": int(self.table.idx[row]), "label": CLASS_NAMES[int(self.table.label[row])],
                               "plane": str(self.table.plane[row]) or None,
                               "area_mm2": round(float(self.table.area_mm2[row]), 2), "distance": round(float(d), 4)})
        nearest = float(self.trunk_index.search(trunk, 1)[0][0, 0] if self.trunk_index is not None else dist[0, 0])
        return {
            "prediction": CLASS_NAMES[int(nir.classes_[winner])],
            "confidence": round(float(proba[winner]), 4),
            "probabilities": {CLASS_NAMES[int(c)]: round(float(p), 4) for c, p in zip(nir.classes_, proba)},
            "nir_positions": {CLASS_NAMES[int(c)]: int(v) for c, v in zip(nir.classes_, positions)},
            "knn_vote": {CLASS_NAMES[int(c)]: round(float(p), 4) for c, p in zip(self.knn.classes_, knn)},
            "retrievals": retrievals,
            "no_similar_case": nearest > self.far_threshold,
            "nearest_distance": round(nearest, 4),
            "disclaimer": DISCLAIMER,
        }

    def case(self, case_id: int, style: str = "normal") -> dict:
        row = self._row(case_id)
        out = {"case_id": case_id, "label": CLASS_NAMES[int(self.table.label[row])],
               "plane": str(self.table.plane[row]) or None, "area_mm2": round(float(self.table.area_mm2[row]), 2),
               "in_archive": bool(np.isin(row, self.archive_rows))}
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
