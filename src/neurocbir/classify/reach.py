"""How far the tumor-type evidence may lie: "no close tumor case".

The calibrated confidence is fitted on held-out queries (training patients the network never
saw, and other hospitals' held-out slices of a known type) whose nearest archive cases of a tumor
type lay at some distance. A query whose nearest typed cases are all farther than nearly every
one of those queries' is outside what the calibration saw: its neighbours' vote is still the
answer, but no calibrated confidence holds for it and no type is ruled out.

The reach is the ``percentile`` (99) of the held-out queries' distance to their ``rank``-th
(5th: as many as the app shows) nearest typed case, fitted by
:func:`neurocbir.training.reach.fit_reach` and stored with the run (``evidence_reach.json``).
Distances are the store's: squared L2 between unit embeddings (2 - 2 cos).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neurocbir.errors import ConfigurationError
from neurocbir.files import write_json

FILE = "evidence_reach.json"
#: which nearest typed case's distance is compared (the app shows five)
RANK = 5
#: the share of held-out queries whose rank-th nearest typed case lies within the reach
PERCENTILE = 99.0


@dataclass(frozen=True)
class EvidenceReach:
    """Beyond ``threshold`` at the ``rank``-th nearest typed case, the evidence is "not close"."""

    rank: int
    threshold: float
    how: str

    def check(self, distances: np.ndarray) -> dict | None:
        """None where the ``rank``-th nearest typed case (``distances`` sorted, the query's own
        copies left out) lies within reach; else what the answer shows about it."""
        if len(distances) < self.rank or float(distances[self.rank - 1]) <= self.threshold:
            return None
        return {
            "rank": self.rank,
            "distance": round(float(distances[self.rank - 1]), 4),
            "threshold": round(self.threshold, 4),
            "how": self.how,
        }


def rank_distances(queries: np.ndarray, archive: np.ndarray, rank: int = RANK) -> np.ndarray:
    """(n,) each query's squared L2 distance to its ``rank``-th nearest archive row (unit vectors)."""

    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    cos = unit(queries) @ unit(archive).T
    return 2.0 - 2.0 * np.sort(cos, axis=1)[:, -rank]


def fit(distances: np.ndarray, how: str, rank: int = RANK, percentile: float = PERCENTILE) -> dict:
    """The reach's document from held-out queries' ``rank``-th distances (:func:`rank_distances`)."""
    distances = np.asarray(distances, float)
    threshold = float(np.percentile(distances, percentile))
    return {
        "rank": rank,
        "percentile": percentile,
        "threshold": round(threshold, 6),
        "how": f"the {percentile:g}th percentile of {len(distances)} held-out queries' distance to their "
        f"{_ordinal(rank)} nearest case of a tumor type ({how})",
    }


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def save(run: Path | str, doc: dict) -> None:
    write_json(Path(run) / FILE, doc)


def load(run: Path | str) -> EvidenceReach | None:
    """The run's reach, or None for a run fitted before it (no "no close tumor case" check)."""
    path = Path(run) / FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        return EvidenceReach(int(doc["rank"]), float(doc["threshold"]), str(doc["how"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(
            f"{path} is corrupt ({type(exc).__name__}): refit it with `neurocbir calibrate RUN --reach`"
        ) from None
