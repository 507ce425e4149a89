"""Choose how a run answers "no tumor found" (:class:`~neurocbir.classify.presence.PresenceRule`)
on slices its network never trained on: a run trained with ``holdout_extra`` (the CPU preset)
keeps 1/7 of the training patients and of the other hospitals' development groups out of training.

The archive's presence model is fitted, as an archive fits it, on the slices the network trained
on (figshare training patients: tumor; the development part's training groups: tumor and no
tumor) and scores the held-out ones; held-out development slices that twin a trained-on slice
(:mod:`~neurocbir.retrieval.duplicates`) are left out, and so are TCGA tumor slices whose mask
covers less than :data:`MIN_TCGA_SHARE` of the slice (no tumor plainly visible on T1c; the
other-hospitals issue counts them apart too). Rules tried: P(no tumor) above each of
:data:`THRESHOLDS` of a score (P(no tumor) itself, or that and the decoder's peak combined with
each weight of :data:`WEIGHTS`, :class:`~neurocbir.classify.presence.PresenceRule`), with and
without the decoder's veto at each of :data:`VETOES`, and where the run reads a presence
decoder, with and without the tumor decoder's veto at each of :data:`TUMOR_VETOES` (added after
the validation part showed a plainly visible meningioma called "no tumor" at a presence decoder
peak of 0.02 and a tumor decoder peak of 0.73). Chosen: among
the rules that call at most :data:`MAX_MISSED` of every source's held-out tumor slices "no tumor"
(figshare patients and each development source apart; TCGA :data:`SOURCE_MAX_MISSED`; always
:data:`MIN_ALLOWED_SLICES` slice of a source: with three runs pooled, Kaggle and SARTAJ hold out 7
tumor slices each, where 2 % allowed none and one Kaggle slice forced a decoder veto that lost
half of every source's no-tumor slices, docs/results.md "presence-held-out"), the one
that finds the most held-out no-tumor slices, the mean of the sources' shares; ties go to the
first tried (P(no tumor) alone, then the least decoder weight; no veto, then the highest veto: the
decoder overrules least). The weights were added after the pooled held-out slices of three runs
showed the decoder's peak separating each source's tumor from its no-tumor slices as well as P(no
tumor) or better (AUROC 0.89-1.00 against 0.84-1.00), while a single veto on it could use little of that. Where no rule meets the
bounds, the one that exceeds them least, and ``how`` says so. (The mean, not the worst source as
before: the worst was SARTAJ's 32 held-out slices, where one slice moves the share 3 points, and
it chose a rule that found fewer no-tumor slices in Br35H and Kaggle. TCGA's own bound: the 2 %
held TCGA to a stricter target than the issue's, and only a decoder veto that lost half of
every source's no-tumor slices met it. Both seen on the pooled held-out slices of two runs,
docs/results.md "presence-held-out".)

A seventh of the development groups is few: Br35H's tumor slices come in near-duplicate sets, and
the 36 held out of the served run are 8 of them. The held-out part turns with the test fold
(:func:`~neurocbir.training.holdout.extra_holdout_split`), so runs of the same recipe on other
folds (``pool``) add theirs, each scored by its own network and archive; the chosen run's test
slices are neither scored nor fitted on (a pooled run trained on them, so their images only serve
to leave out held-out development slices that twin them).
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
#: the tumor decoder's vetoes, where the rule reads a presence decoder (None, tried first: no such veto)
TUMOR_VETOES = (None, 0.9, 0.8, 0.7, 0.6, 0.5)
#: weights of the decoder's peak in the score (0: P(no tumor) alone, tried first)
WEIGHTS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8)
MAX_MISSED = 0.02
#: a source's own bound where the issue's target differs: TCGA's lower-grade gliomas often do not
#: enhance (its target for slices whose mask covers >= 1 %: 10 %; this keeps the same margin as 2 % to 3 %)
SOURCE_MAX_MISSED = {"tcga-lgg": 0.08}
#: a rule may always call this many of a source's held-out tumor slices "no tumor": where the bound
#: is under one slice (2 % of Kaggle's 7), one slice would otherwise decide the rule for every source
MIN_ALLOWED_SLICES = 1
MIN_TCGA_SHARE = 0.01


def _evidence(model, images) -> tuple[np.ndarray, dict]:
    """Stored descriptors of ``images``, 32 at a time, and what their tumor maps show: the
    decoder's peak probability (``peak``: the presence decoder's where the run has one; ``tumor_peak``:
    the tumor decoder's), the mean of the map's highest 1 % (``top``) and the share of the map above
    0.5 (``area``)."""
    desc, maps, batch = [], {"peak": [], "tumor_peak": [], "top": [], "area": []}, []
    for image in [*images, None]:
        if image is not None:
            batch.append(image)
        if batch and (image is None or len(batch) == 32):
            _, d, probs, shown = model.analyse_batch(batch, presence=True)
            desc.append(d)
            maps["peak"] += [float(m.max()) for m in shown]  # the presence decoder's, where the run has one
            maps["tumor_peak"] += [float(p.max()) for p in probs]  # the tumor decoder's
            for p in probs:
                flat = p.ravel()
                k = max(1, len(flat) // 100)  # the highest 1 %, without sorting the whole map
                maps["top"].append(float(np.partition(flat, -k)[-k:].mean()))
                maps["area"].append(float((flat > 0.5).mean()))
            batch = []
    return np.concatenate(desc).astype(np.float64), {k: np.array(v) for k, v in maps.items()}


def held_out_slices(
    run: Path, table: CaseTable, without_fold: int | None = None, mirror: bool | None = None
) -> tuple[dict, int]:
    """Every training-fold slice and development slice: descriptor, what the tumor map shows
    (:func:`_evidence`), tumor, source, group (a patient, or a development group), figshare fold (0
    for other sources), whether the network trained on it; and how many held-out development twins
    were left out.
    ``without_fold``: figshare slices of that test fold are left out altogether (another fold's run
    pooled into a choice for this fold's must not score or fit on its test slices). ``mirror``: the
    tumor maps of the scan alone, or with its mirror (default: as the run's ``mirror.json`` says)."""
    from neurocbir.models.inference import load_model
    from neurocbir.training.holdout import development_holdout, holdout_split

    cfg = TrainConfig(**json.loads((Path(run) / "config.json").read_text()))
    fit_rows, cal_rows = holdout_split(cfg, table)
    found = development_holdout(cfg, table)
    if found is None or not len(cal_rows):
        raise InvalidInput(
            f"{run} holds no patients or development groups out of training (train it with the CPU preset)"
        )
    dev, dev_fit, dev_held, n_twins = found
    model = load_model(run, mirror=mirror)
    fig_rows = np.concatenate([fit_rows, cal_rows])
    fig_rows = fig_rows[table.fold[fig_rows] != without_fold] if without_fold is not None else fig_rows
    d1, m1 = _evidence(model, (table.load_image(int(i)) for i in fig_rows))
    d2, m2 = _evidence(model, (dev.load_image(int(i)) for i in range(len(dev))))
    held = np.isin(np.arange(len(dev)), dev_held)  # twins of trained-on slices are neither trained on nor held
    small = np.zeros(len(dev), bool)  # held-out tumors too small to see: not counted (trained-on ones fit as stored)
    small[dev_held] = [dev.tumor[i] and dev.has_mask(i) and dev.load_mask(i).mean() < MIN_TCGA_SHARE for i in dev_held]
    keep = np.concatenate([np.ones(len(fig_rows), bool), (held | np.isin(np.arange(len(dev)), dev_fit)) & ~small])
    out = {
        "desc": np.vstack([d1, d2]), **{k: np.concatenate([m1[k], m2[k]]) for k in m1},
        "fold": np.concatenate([table.fold[fig_rows], np.zeros(len(dev), int)]),  # 0: not figshare
        "trained": np.concatenate([np.isin(fig_rows, fit_rows), np.isin(np.arange(len(dev)), dev_fit)]),
        "tumor": np.concatenate([table.label[fig_rows] < 3, dev.tumor]),
        "source": np.concatenate([np.full(len(fig_rows), "figshare"), dev.sources.astype(str)]),
        "group": np.concatenate([np.char.add("patient:", table.patient_id[fig_rows].astype(str)), np.char.add("group:", dev.groups.astype(str))]),
    }  # fmt: skip
    return {k: v[keep] for k, v in out.items()}, n_twins


def bound(source: str, n_tumor: int | None = None) -> float:
    """The most of a source's held-out tumor slices a rule may call 'no tumor' (of ``n_tumor``
    slices: at least :data:`MIN_ALLOWED_SLICES` of them)."""
    share = max(MAX_MISSED, SOURCE_MAX_MISSED.get(source, MAX_MISSED))
    return share if not n_tumor else max(share, MIN_ALLOWED_SLICES / n_tumor)


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


def _fold(run: Path) -> int:
    return int(json.loads((Path(run) / "config.json").read_text())["fold"])


def pooled_slices(run: Path, table: CaseTable, pool: tuple = ()) -> tuple[dict, np.ndarray, int]:
    """(held-out and trained-on slices of ``run`` and of the runs in ``pool``, the same recipe on
    other test folds, each scored by its own network and its own archive's presence model; P(no
    tumor) of each; held-out twins left out). Figshare slices of ``run``'s test fold are neither scored nor fitted on."""
    fold = _fold(run)
    folds = [_fold(r) for r in pool]
    if fold in folds or len(set(folds)) < len(folds):
        raise InvalidInput("runs pooled for the 'no tumor' choice must each be of another test fold")
    parts, probs, twins = [], [], 0
    for i, r in enumerate((run, *pool)):
        s, n = held_out_slices(Path(r), table, fold if i else None)
        probs.append(TumorPresence().fit(s["desc"][s["trained"]], s["tumor"][s["trained"]]).proba_no_tumor(s["desc"]))
        parts.append(s)
        twins += n
    s = {k: np.concatenate([x[k] for x in parts]) for k in parts[0]}
    return s, np.concatenate(probs), twins


def excess(r: dict, n_tumor: dict) -> float:
    """The most any source's share of tumor slices called 'no tumor' exceeds its bound."""
    return max(m - bound(src, n_tumor[src]) for src, (_, m) in r.items() if not np.isnan(m))


def found(r: dict) -> float:
    """The share of no-tumor slices found, the mean over the sources that have some (each the same weight)."""
    return float(np.mean([f for f, _ in r.values() if not np.isnan(f)]))


def choose_presence(
    run: Path | str, table: CaseTable, save: bool = True, pool: tuple = (), slices: tuple | None = None
) -> tuple[PresenceRule, list]:
    """(the rule chosen, every rule tried with its per-source rates and whether it keeps every
    source within its bound); ``save``: as the run's
    ``presence.json``. ``pool``: runs of the same recipe on other test folds, whose held-out
    slices (other development groups: the held-out part turns with the fold) join the choice.
    ``slices``: what :func:`pooled_slices` gave for these runs, where the caller has it already."""
    s, p, n_twins = slices if slices is not None else pooled_slices(Path(run), table, tuple(pool))
    tried = []
    # a second decoder's veto only where the runs read a presence decoder (else both peaks are the tumor decoder's)
    tumor_peak = s.get("tumor_peak", s["peak"])
    tumor_vetoes = TUMOR_VETOES if not np.array_equal(s["peak"], tumor_peak) else (None,)
    for tumor_veto in tumor_vetoes:
        for weight in WEIGHTS:
            for veto in VETOES:
                for t in THRESHOLDS:
                    rule = PresenceRule(t, veto, decoder_weight=weight, tumor_veto=tumor_veto)
                    tried.append((rule, rates(rule.no_tumor(p, s["peak"], tumor_peak), s)))

    held = ~s["trained"]
    n_tumor = {src: int((held & (s["source"] == src) & s["tumor"]).sum()) for src in set(s["source"][held])}
    tried = [(rule, r, excess(r, n_tumor) <= 0) for rule, r in tried]
    within = [(rule, r) for rule, r, ok in tried if ok]
    if within:  # max() keeps the first of equals
        best = max(within, key=lambda x: found(x[1]))
        met = "every source's tumor slices called 'no tumor' within its bound, then"
    else:
        best = min(((rule, r) for rule, r, _ in tried), key=lambda x: (excess(x[1], n_tumor), -found(x[1])))
        met = "no rule kept every source's tumor slices called 'no tumor' within its bound: the least over, then"
    counts = {
        str(src): [int((held & (s["source"] == src) & k).sum()) for k in (s["tumor"], ~s["tumor"])] for src in best[1]
    }
    how = (
        f"chosen on slices the network never trained on (held-out training patients and development groups"
        f"{f' of {1 + len(pool)} runs of this recipe, one per test fold, this fold its own' if pool else ''}; "
        f"{n_twins} held-out twins of trained-on slices and TCGA tumors under {MIN_TCGA_SHARE:.0%} of the slice "
        f"left out; tumor / no-tumor slices per source {counts}; bounds: {MAX_MISSED:.0%}, TCGA "
        f"{bound('tcga-lgg'):.0%}, and at least {MIN_ALLOWED_SLICES} slice of a source): {met} the most no-tumor slices found, the mean over the sources "
        f"({found(best[1]):.3f})"
    )
    rule = PresenceRule(
        best[0].threshold, best[0].decoder_veto, how, best[0].decoder_weight, tumor_veto=best[0].tumor_veto
    )
    if save:

        def share(v: float) -> float | None:  # None where a source has none of the kind
            return None if np.isnan(v) else round(v, 4)

        measured = {
            str(k): {"no_tumor_found": share(f), "tumor_called_none": share(m)} for k, (f, m) in best[1].items()
        }
        save_rule(run, rule, measured)
    return rule, tried
