"""Choose how a run answers "no tumor found" (:class:`~neurocbir.classify.presence.PresenceRule`)
on slices its network never trained on: a run trained with ``holdout_extra`` (the CPU preset)
keeps 1/7 of the training patients and of the other hospitals' development groups out of training.

The archive's presence model is fitted, as an archive fits it, on the slices the network trained
on (figshare training patients: tumor; the development part's training groups: tumor and no
tumor) and scores the held-out ones; held-out development slices that twin a trained-on slice
(:mod:`~neurocbir.retrieval.duplicates`) are left out. Rules tried: P(no tumor) above each of
:data:`THRESHOLDS`, with and without the decoder's veto at each of :data:`VETOES`. Chosen: among
the rules that call at most :data:`MAX_MISSED` of every source's held-out tumor slices "no tumor"
(figshare patients and each development source apart), the one that finds the most held-out
no-tumor slices in its worst source; ties go to the higher veto (the decoder overrules least).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from neurocbir.classify.presence import PresenceRule, TumorPresence, save_rule
from neurocbir.data.cases import CaseTable
from neurocbir.errors import InvalidInput
from neurocbir.models.runs import TrainConfig

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
VETOES = (None, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
MAX_MISSED = 0.02


def _evidence(model, images) -> tuple[np.ndarray, np.ndarray]:
    """Stored descriptors and the decoder's peak probability of ``images``, 32 at a time."""
    desc, peak, batch = [], [], []
    for image in [*images, None]:
        if image is not None:
            batch.append(image)
        if batch and (image is None or len(batch) == 32):
            _, d, probs = model.analyse_batch(batch)
            desc.append(d)
            peak += [float(p.max()) for p in probs]
            batch = []
    return np.concatenate(desc).astype(np.float64), np.array(peak)


def held_out_slices(run: Path, table: CaseTable) -> tuple[dict, int]:
    """Every training-fold slice and development slice: descriptor, decoder peak, tumor, source,
    whether the network trained on it; and how many held-out development twins were left out."""
    from neurocbir.data.external import load_external, part
    from neurocbir.models.inference import load_model
    from neurocbir.retrieval.duplicates import DuplicateIndex
    from neurocbir.training.holdout import extra_holdout_split, holdout_split

    cfg = TrainConfig(**json.loads((Path(run) / "config.json").read_text()))
    fit_rows, cal_rows = holdout_split(cfg, table)
    dev = part(load_external(cfg.extra_cases), "development") if cfg.extra_cases else None
    dev_fit, dev_held = extra_holdout_split(cfg, dev) if dev is not None else ([], [])
    if not len(dev_held) or not len(cal_rows):
        raise InvalidInput(
            f"{run} holds no patients or development groups out of training (train it with the CPU preset)"
        )
    model = load_model(run)
    fig_rows = np.concatenate([fit_rows, cal_rows])
    d1, p1 = _evidence(model, (table.load_image(int(i)) for i in fig_rows))
    d2, p2 = _evidence(model, (dev.load_image(int(i)) for i in range(len(dev))))
    index = DuplicateIndex.of_images(
        [*(table.load_image(int(i)) for i in fit_rows), *(dev.load_image(int(i)) for i in dev_fit)]
    )
    twin = np.zeros(len(dev), bool)
    twin[dev_held] = [bool(index.find(dev.load_image(int(i)))) for i in dev_held]
    keep = np.concatenate([np.ones(len(fig_rows), bool), ~twin])
    out = {
        "desc": np.vstack([d1, d2]), "peak": np.concatenate([p1, p2]),
        "trained": np.concatenate([np.isin(fig_rows, fit_rows), np.isin(np.arange(len(dev)), dev_fit)]),
        "tumor": np.concatenate([table.label[fig_rows] < 3, dev.tumor]),
        "source": np.concatenate([np.full(len(fig_rows), "figshare"), dev.sources.astype(str)]),
    }  # fmt: skip
    return {k: v[keep] for k, v in out.items()}, int(twin.sum())


def rates(no_tumor: np.ndarray, s: dict) -> dict:
    """Per source of the held-out slices: (share of no-tumor slices called 'no tumor', share of
    tumor slices called it); NaN where a source has none of the kind."""
    held, out = ~s["trained"], {}
    for src in sorted(set(s["source"][held])):
        at = held & (s["source"] == src)
        out[src] = tuple(
            float(no_tumor[at & want].mean()) if (at & want).any() else float("nan")
            for want in (~s["tumor"], s["tumor"])
        )
    return out


def choose_presence(run: Path | str, table: CaseTable, save: bool = True) -> tuple[PresenceRule, list]:
    """(the rule chosen, every rule tried with its per-source rates); ``save``: as the run's
    ``presence.json``."""
    s, n_twins = held_out_slices(Path(run), table)
    p = TumorPresence().fit(s["desc"][s["trained"]], s["tumor"][s["trained"]]).proba_no_tumor(s["desc"])
    tried, best = [], None
    for veto in VETOES:
        for t in THRESHOLDS:
            rule = PresenceRule(t, veto)
            r = rates(np.array([rule.no_tumor(a, b) for a, b in zip(p, s["peak"])]), s)
            missed = max(m for _, m in r.values() if not np.isnan(m))
            found = min(f for f, _ in r.values() if not np.isnan(f))
            tried.append((rule, r))
            if missed <= MAX_MISSED and (best is None or found > best[1] + 1e-9):
                best = (rule, found, r)
    if best is None:
        raise InvalidInput(f"no rule calls at most {MAX_MISSED:.0%} of every source's held-out tumor slices 'no tumor'")
    held = ~s["trained"]
    counts = {src: [int((held & (s["source"] == src) & k).sum()) for k in (s["tumor"], ~s["tumor"])] for src in best[2]}
    how = (
        f"chosen on slices the network never trained on (held-out training patients and development groups; "
        f"{n_twins} held-out twins of trained-on slices left out; tumor / no-tumor slices per source {counts}): "
        f"at most {MAX_MISSED:.0%} of every source's tumor slices called 'no tumor', then the most no-tumor "
        f"slices found in the worst source ({best[1]:.3f})"
    )
    rule = PresenceRule(best[0].threshold, best[0].decoder_veto, how)
    if save:
        save_rule(run, rule, {src: {"no_tumor_found": f, "tumor_called_none": m} for src, (f, m) in best[2].items()})
    return rule, tried
