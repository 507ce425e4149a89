"""A presence decoder for a trained lesion run: whether a slice shows a tumor, taught to a second
tumor decoder on the run's frozen network.

The run's own decoder draws the outline and weights the embedding's pooling; the "no tumor" rule
(:mod:`neurocbir.training.presence_choice`) also reads its peak, and on other hospitals' slices
without a tumor it often fires. Teaching that decoder's peak whether a slice shows a tumor while
the whole network trains (``extra.peak_weight``) found more no-tumor slices but cost tumor type
(docs/training.md). Here a copy of the decoder (:meth:`~neurocbir.models.lesion.LesionNet.add_presence_decoder`)
learns it alone, on the frozen trunk (or, with ``branch``, on its own fine-tuned copy of the trunk's
stages after stride 8, the stages below shared and frozen): the mask loss where the mask is known, the peak of its map
pushed towards "a tumor is shown" (BCE) on the same slices, and up on tumor slices whose mask is
unknown, on fresh augmented views of the slices the run trained on (its held-out patients and
development groups stay unseen, for choosing the rule). The embedding, the outline and every
neighbour stay the run's; only the presence evidence changes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from neurocbir.data.cases import NO_TUMOR_LABEL
from neurocbir.models.lesion import LesionNet

#: the recipe: epochs over the run's training slices, the peak loss's weight, AdamW's learning rate
EPOCHS, PEAK_WEIGHT, LR, BATCH = 6, 0.5, 5e-4, 32
#: share of a batch's no-tumor slices given a pasted tumor (:func:`paste_tumors`; 0: none)
PASTE = 0.0
#: draw slices so that each source's tumor and no-tumor slices weigh the same (:func:`balanced_weights`)
BALANCE = False
#: the presence decoder's own copy of the trunk's stages after stride 8, trained at this share of LR
#: (False: it reads the run's frozen trunk alone)
BRANCH, BRANCH_LR_SHARE = False, 0.2
INFO_FILE = "presence_decoder.json"


def train_presence_decoder(
    net: LesionNet,
    images: torch.Tensor,
    masks: torch.Tensor,
    labels: np.ndarray,
    known: torch.Tensor | None,
    seed: int = 0,
    epochs: int = EPOCHS,
    bf16: bool = False,
    progress: bool = True,
    sources: np.ndarray | None = None,
    paste: float = PASTE,
    branch: bool = BRANCH,
) -> LesionNet:
    """Add a presence decoder to ``net`` (a copy of its decoder) and train it alone on the frozen
    network (see the module). ``images`` / ``masks`` / ``labels`` / ``known`` as
    :func:`neurocbir.training.lesion.train_lesion` takes them. ``sources``: each slice's source,
    to draw each source's tumor and no-tumor slices with the same weight (None: every slice once an
    epoch); ``paste``: the share of no-tumor slices given a tumor pasted from a slice with a known
    mask (:func:`paste_tumors`); ``branch``: the decoder gets its own copy of the trunk's stages
    after stride 8, trained with it (their batch norms keep the run's statistics). Returns ``net``."""
    from monai.losses import DiceCELoss

    from neurocbir.training.common import seed_everything
    from neurocbir.training.lesion import _autocast, augment_batch

    if epochs < 1 or len(labels) < BATCH:
        raise ValueError(f"a presence decoder needs at least one epoch and {BATCH} slices")
    seed_everything(seed)
    net.add_presence_decoder(branch).requires_grad_(False)
    net.eval()  # the trunk's batch norms keep their statistics
    head = net.presence_decoder.requires_grad_(True).train()
    own = [p for n, p in head.named_parameters() if not n.startswith("trunk.")]
    groups = [{"params": own, "lr": LR}]
    if branch:
        head["trunk"].eval()  # the copied stages' batch norms keep the run's statistics
        groups.append({"params": list(head["trunk"].parameters()), "lr": LR * BRANCH_LR_SHARE})
    opt = torch.optim.AdamW(groups, lr=LR, weight_decay=1e-4)
    steps = len(labels) // BATCH
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in groups], total_steps=epochs * steps, pct_start=0.15
    )
    seg, gen = DiceCELoss(sigmoid=True), torch.Generator().manual_seed(seed)
    y_all = torch.as_tensor(labels)
    k_all = torch.ones(len(labels), dtype=torch.bool) if known is None else torch.as_tensor(known, dtype=torch.bool)
    bar = tqdm(total=epochs * steps, desc="presence decoder", unit="step", disable=not progress, mininterval=10)
    weights = None if sources is None else torch.as_tensor(balanced_weights(sources, labels != NO_TUMOR_LABEL))
    donors = torch.nonzero(k_all & (masks.flatten(1).amax(1) > 0)).flatten()
    for epoch in range(epochs):
        order = (
            torch.randperm(len(labels), generator=gen)
            if weights is None
            else torch.multinomial(weights, len(labels), replacement=True, generator=gen)
        )
        for s in range(steps):
            rows = order[s * BATCH : (s + 1) * BATCH]
            x, m, y, k = images[rows].float(), masks[rows].float(), y_all[rows].clone(), k_all[rows].clone()
            if paste and len(donors):
                x, m, y, k = paste_tumors(x, m, y, k, images, masks, donors, paste, gen)
            x, m = augment_batch(x, m, gen)
            with _autocast(torch.device("cpu"), bf16):
                with torch.no_grad():
                    _, feats, fine = net.trunk_features(x)
                logits = net.decode(feats, fine, presence=True).float()
            loss = _loss(logits, m, y, k, seg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{float(loss.detach()):.3f}", refresh=False)
    bar.close()
    return net.eval()


def balanced_weights(sources: np.ndarray, tumor: np.ndarray) -> np.ndarray:
    """Each slice's chance of being drawn: within a source, its tumor and its no-tumor slices weigh
    the same (a source of 50 tumor and 450 no-tumor slices no longer teaches that its look means
    "no tumor"); each source keeps its share of the slices."""
    sources, tumor = np.asarray(sources).astype(str), np.asarray(tumor, bool)
    w = np.ones(len(sources))
    for src in np.unique(sources):
        at = sources == src
        kinds = [k for k in (True, False) if (at & (tumor == k)).any()]
        for k in kinds:
            w[at & (tumor == k)] = at.sum() / (len(kinds) * (at & (tumor == k)).sum())
    return w / w.sum()


def paste_tumors(x, m, y, known, images, masks, donors, share: float, gen: torch.Generator):
    """Give ``share`` of the batch's no-tumor slices a tumor: a donor slice's tumor (a slice with a
    known, non-empty mask, possibly mirrored) blended in at the same place with a soft edge, its
    intensities matched to the receiving head's; skipped where the tumor would leave the head.
    The slice then has the donor's mask, known. ``x`` / ``m``: (B, 1, S, S) float in [-1, 1] / 0-1."""
    x, m = x.clone(), m.clone()
    for i in torch.nonzero((y == NO_TUMOR_LABEL) & (torch.rand(len(y), generator=gen) < share)).flatten():
        d = donors[torch.randint(len(donors), (1,), generator=gen)].item()
        dx, dm = images[d].float(), masks[d].float()
        if torch.rand(1, generator=gen).item() < 0.5:
            dx, dm = dx.flip(-1), dm.flip(-1)
        head, donor_head = x[i] > -0.9, dx > -0.9
        if (head & (dm > 0)).sum() < 0.95 * dm.sum() or head.sum() < 100:
            continue
        alpha = F.avg_pool2d(F.avg_pool2d(dm[None], 5, 1, 2), 5, 1, 2)[0]
        mu, sd = x[i][head].mean(), x[i][head].std() + 1e-3
        dmu, dsd = dx[donor_head].mean(), dx[donor_head].std() + 1e-3
        lesion = ((dx - dmu) / dsd * sd + mu).clamp(-1, 1)
        x[i] = x[i] * (1 - alpha) + lesion * alpha
        m[i], y[i], known[i] = dm, 0, True
    return x, m, y, known


def _loss(logits: torch.Tensor, m: torch.Tensor, y: torch.Tensor, known: torch.Tensor, seg) -> torch.Tensor:
    """Mask loss and peak loss where the mask is known; the peak up on tumor slices without one."""
    loss = logits.sum() * 0
    if bool(known.any()):
        up = F.interpolate(logits[known], size=m.shape[-2:], mode="bilinear", align_corners=False)
        peak = logits[known].flatten(1).amax(1)
        loss = (
            loss
            + seg(up, m[known])
            + PEAK_WEIGHT * F.binary_cross_entropy_with_logits(peak, m[known].flatten(1).amax(1))
        )
    unknown = ~known & (y != NO_TUMOR_LABEL)
    if bool(unknown.any()):
        peak = logits[unknown].flatten(1).amax(1)
        loss = loss + F.binary_cross_entropy_with_logits(peak, torch.ones_like(peak))
    return loss


def add_presence_decoder(
    run: Path | str,
    epochs: int = EPOCHS,
    progress: bool = True,
    balance: bool = BALANCE,
    paste: float = PASTE,
    branch: bool = BRANCH,
) -> dict:
    """Train a presence decoder for ``run``'s first trial on the slices it trained on, write the
    checkpoint (atomically) and :data:`INFO_FILE`. The run's index is keyed by the checkpoint's
    hash, which changes, while the embeddings do not: it is re-labelled where every weight but the
    presence decoder's is unchanged, re-embedded otherwise. Returns the info."""
    from neurocbir.data.cases import load_cases
    from neurocbir.files import write_json
    from neurocbir.models.runs import checkpoint_sha256, first_trial, trial_dir
    from neurocbir.retrieval.ingest import index_run
    from neurocbir.training.holdout import holdout_split
    from neurocbir.training.lesion import cpu_bf16_supported, load_tensors, save_checkpoint
    from neurocbir.training.lesion_run import cpu_name, extra_training_cases, with_extra_cases

    run = Path(run)
    t0 = time.time()
    trial = first_trial(run)
    ckpt = trial_dir(run, trial) / "checkpoint.pt"
    cfg, net, weights_sha256 = _load_trainable(run, ckpt)
    before = {checkpoint_sha256(run, trial, mirror): mirror for mirror in (False, True)}
    old_state = _encoding_weights(ckpt)
    table = load_cases(cfg.data)
    images, masks = load_tensors(table, cfg.image_size, cfg.intensity)
    fit_rows, _ = holdout_split(cfg, table)
    extra, _ = extra_training_cases(cfg)
    x, m, y, known = with_extra_cases(images[fit_rows], masks[fit_rows], table.label[fit_rows], extra)
    bf16 = bool(cfg.extra.get("cpu_bf16")) and cpu_bf16_supported()
    sources = _sources(cfg, len(fit_rows)) if balance else None
    train_presence_decoder(net, x, m, y, known, cfg.first_seed, epochs, bf16, progress, sources, paste, branch)
    save_checkpoint(ckpt, cfg, net, weights_sha256)
    info = {
        "how": (
            "a copy of the tumor decoder trained alone on the frozen network (mask loss, and the peak of its map "
            f"taught whether the view shows a tumor, weight {PEAK_WEIGHT}), {epochs} epochs over the {len(y)} slices "
            "the run trained on; held-out patients and development groups unseen"
            + ("; each source's tumor and no-tumor slices drawn with the same weight" if balance else "")
            + (f"; {paste:.0%} of the no-tumor slices drawn given a tumor pasted from a masked slice" if paste else "")
            + ("; with its own copy of the trunk's stages after stride 8, trained with it" if branch else "")
        ),
        "branch": branch,
        "balance": balance,
        "paste": paste,
        "epochs": epochs,
        "slices": len(y),
        "precision": "bfloat16" if bf16 else "float32",
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "train_s": round(time.time() - t0, 1),
    }
    info["index"] = "re-labelled" if _relabel_index(run, trial, before, old_state) else "re-embedded"
    if info["index"] == "re-embedded":
        index_run(run, cfg.data)
    info["rule"] = _choose_rule_again(run, table)
    info["region_search"] = _fit_region_search_again(run, table)
    write_json(run / INFO_FILE, info)
    return info


def _relabel_index(run: Path, trial: int, before: dict[str, bool], old_state: dict) -> bool:
    """Key the trial's index to its new checkpoint where it was built by the old one (``before``:
    the old hashes, plain and mirrored) and the new checkpoint's weights, the presence decoder's
    aside, are the old ones (``old_state``) bit for bit: the embeddings it holds are then the ones
    a re-embedding would give. False (nothing changed) otherwise."""
    from neurocbir.files import write_json
    from neurocbir.models.runs import checkpoint_sha256, trial_dir
    from neurocbir.retrieval.index import IndexMismatchError, read_manifest

    tdir = trial_dir(run, trial)
    try:
        manifest = read_manifest(tdir / "index.faiss")
    except (FileNotFoundError, IndexMismatchError):
        return False
    mirror = before.get(manifest["checkpoint_sha256"])
    if mirror is None or not (tdir / "embeddings.npz").is_file():
        return False
    new_state = _encoding_weights(tdir / "checkpoint.pt")
    if new_state.keys() != old_state.keys() or not all(torch.equal(v, new_state[k]) for k, v in old_state.items()):
        return False
    write_json(tdir / "index.faiss.json", {**manifest, "checkpoint_sha256": checkpoint_sha256(run, trial, mirror)})
    return True


def _encoding_weights(ckpt: Path) -> dict:
    """A checkpoint's weights, the presence decoder's aside."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state"]
    return {k: v for k, v in state.items() if not k.startswith("presence_decoder.")}


def _sources(cfg, n_figshare: int) -> np.ndarray:
    """The source of each slice a run trained on: its figshare slices, then its development slices."""
    from neurocbir.data.external import load_external, part
    from neurocbir.training.holdout import extra_holdout_split

    if not cfg.extra_cases:
        return np.full(n_figshare, "figshare")
    dev = part(load_external(cfg.extra_cases), "development")
    fit, _ = extra_holdout_split(cfg, dev)
    return np.concatenate([np.full(n_figshare, "figshare"), dev.sources[fit].astype(str)])


def _fit_region_search_again(run: Path, table) -> str | None:
    """A region's presence may read the new decoder's map: the run's region search is fitted again
    on its held-out slices (the decoder whose map finds more tumor boxes is chosen); where it cannot
    be, the old fit stays (it reads the tumor decoder's map, which is unchanged). The decoder read."""
    from neurocbir.classify import region
    from neurocbir.errors import InvalidInput
    from neurocbir.training.regions import fit_region_search

    if not (run / region.FILE).is_file():
        return None
    try:
        return fit_region_search(run, table)["decoder"]
    except InvalidInput:
        return region.load(run, 0.5).decoder


def _choose_rule_again(run: Path, table) -> str:
    """The run's "no tumor" rule read the old decoder's peak: chosen again on the run's own held-out
    slices (``neurocbir calibrate RUN --presence --pool ...`` pools other folds' runs), or removed
    where the run holds none out (the app then answers without it: presence not assessed)."""
    from neurocbir.classify.presence import RULE_FILE
    from neurocbir.errors import InvalidInput
    from neurocbir.training.presence_choice import choose_presence

    try:
        rule, _ = choose_presence(run, table)
    except InvalidInput as exc:
        (run / RULE_FILE).unlink(missing_ok=True)
        return f"none: {exc}"
    return rule.describe()


def _load_trainable(run: Path, ckpt: Path):
    """(config, the network unfused and in float32 without a presence decoder, the pretrained
    weights' hash) of a lesion run's checkpoint."""
    from neurocbir.errors import InvalidInput
    from neurocbir.models.inference import lesion_net
    from neurocbir.models.runs import TrainConfig

    blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    cfg = TrainConfig(**blob["config"])
    if cfg.recipe != "lesion":
        raise InvalidInput(f"{run} is a {cfg.recipe} run: only a lesion run has a tumor decoder")
    # a decoder trained again starts from the outline decoder, not from the old presence decoder
    state = {k: v for k, v in blob["state"].items() if not k.startswith("presence_decoder.")}
    return cfg, lesion_net(cfg, state), blob["weights_sha256"]
