"""Choose whether a lesion run embeds each scan together with its mirror (:mod:`neurocbir.models.mirror`),
on the training patients it held out of training (``holdout_patients``): they are queried against
the other training patients with NIR, once with each scan's own embedding and once with the mean
of its own and its mirror's (on both sides, query and archive), and the mirror is kept only where
its Cohen's kappa there is higher (a tie keeps the cheaper single view). Then the run's own index
and embeddings are rebuilt with what was chosen, so that calibration, the outline level and
region searches are fitted on the embeddings the app will compute. The test fold is embedded for
the run's index, never scored here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.metrics import cohen_kappa_score

from neurocbir.classify.neighbors import NIRClassifier
from neurocbir.data.cases import CaseTable
from neurocbir.errors import InvalidInput
from neurocbir.models import mirror
from neurocbir.models.runs import TrainConfig
from neurocbir.retrieval.index import read_manifest


def _embed(model, table: CaseTable, rows: np.ndarray, batch: int = 32) -> np.ndarray:
    chunks = [
        model.embed([table.load_image(int(i)) for i in rows[b : b + batch]])[0] for b in range(0, len(rows), batch)
    ]
    return np.concatenate(chunks)


def held_out_embeddings(
    run: Path | str, table: CaseTable, both: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(training rows, their embeddings, held-out rows, theirs) of ``run``'s training patients, each
    scan embedded alone or (``both``) as the mean of its own and its mirror's."""
    from neurocbir.models.inference import LesionModel, load_model
    from neurocbir.training.holdout import holdout_split

    cfg = TrainConfig(**json.loads((Path(run) / "config.json").read_text()))
    fit_rows, cal_rows = holdout_split(cfg, table)
    if not len(cal_rows):
        raise InvalidInput(f"{run} holds no training patients out of training: the mirror cannot be chosen")
    model = load_model(run, cfg.first_seed, mirror=both)  # explicit: a run still being trained has no first_trial
    if not isinstance(model, LesionModel):
        raise InvalidInput(f"{run} is not a lesion run: only those embed with the mirror")
    return fit_rows, _embed(model, table, fit_rows), cal_rows, _embed(model, table, cal_rows)


def nir_scores(table: CaseTable, fit_rows, fit_emb, cal_rows, cal_emb) -> tuple[float, float]:
    """(Cohen's kappa, accuracy) of NIR of the held-out embeddings against the training ones."""
    pred = NIRClassifier().fit(fit_emb, table.label[fit_rows]).predict(cal_emb)
    y = table.label[cal_rows]
    return round(float(cohen_kappa_score(y, pred)), 4), round(float(np.mean(pred == y)), 4)


def held_out_kappas(run: Path | str, table: CaseTable) -> dict:
    """NIR kappa and accuracy of ``run``'s held-out training patients against its other training
    patients, with each scan's own embedding (``own``) and with the mirror's mean (``mirror``)."""
    out = {}
    for name, both in (("own", False), ("mirror", True)):
        fit_rows, fit_emb, cal_rows, cal_emb = held_out_embeddings(run, table, both)
        out[f"kappa_{name}"], out[f"accuracy_{name}"] = nir_scores(table, fit_rows, fit_emb, cal_rows, cal_emb)
    return {"n_slices": len(cal_rows), "n_patients": len(np.unique(table.patient_id[cal_rows])), **out}


def choose_mirror(run: Path | str, table: CaseTable) -> dict:
    """Choose and save ``run``'s ``mirror.json`` (see the module), rebuild its index where the
    choice changed the embedding; returns what was saved."""
    from neurocbir.models.runs import checkpoint_sha256, trial_dir, trial_seeds
    from neurocbir.retrieval.ingest import index_run

    run = Path(run)
    measured = held_out_kappas(run, table)
    chosen = measured["kappa_mirror"] > measured["kappa_own"]
    how = (
        f"NIR kappa on {measured['n_patients']} training patients held out of training ({measured['n_slices']} slices) "
        f"against the other training patients: {measured['kappa_own']:.4f} with each scan's own embedding, "
        f"{measured['kappa_mirror']:.4f} with the mean of its own and its mirror's; "
        f"{'the mirror' if chosen else 'the scan alone'} (the mirror only where higher)"
    )
    mirror.save(run, chosen, how, measured)
    for trial in trial_seeds(run, needs="checkpoint.pt"):  # every trial embeds as the file now says
        try:
            current = read_manifest(trial_dir(run, trial) / "index.faiss")["checkpoint_sha256"]
        except FileNotFoundError:
            current = None
        if current != checkpoint_sha256(run, trial, chosen):
            index_run(run, trial=trial)
    return {"mirror_average": chosen, "how": how, "measured": measured}
