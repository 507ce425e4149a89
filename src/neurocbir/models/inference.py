"""Inference: a trained trial loaded once, and embeddings of new scans or cached features.

The one way the service, the CLI, ``neurocbir add``, the evaluation and the benchmarks get a
model: :func:`load_model`. Nothing here trains, so the query path never imports training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from neurocbir.data.cases import CLASS_NAMES
from neurocbir.data.transforms import IMAGE_SIZE
from neurocbir.errors import InvalidInput
from neurocbir.models.cpu_runtime import compile_net
from neurocbir.models.encoders import Encoder, Top, create_encoder
from neurocbir.models.lesion import LesionNet, fuse_for_inference
from neurocbir.models.mirror import mirrored
from neurocbir.models.runs import TrainConfig, checkpoint_sha256, first_trial, trial_dir


@dataclass
class Model:
    """A trial's full encoder: the frozen bottom (``encoder``) and the trained ``top``."""

    run: Path
    trial: int
    encoder: Encoder
    top: Top
    config: TrainConfig
    checkpoint_sha256: str

    @property
    def embedding_dim(self) -> int:
        return self.encoder.embedding_dim

    def embed(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings and trunk descriptors of raw scans: the query and the indexing path."""
        return embed_images(self.encoder, self.top, images)

    def analyse(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(embedding, descriptor, tumor probability map or None) of one scan; this model
        has no tumor decoder."""
        return (*self.embed([image]), None)

    def analyse_batch(self, images: list[np.ndarray], presence: bool = False) -> tuple:
        """:meth:`analyse` of several scans in one pass (the slices of a series); ``presence``: a
        fourth item, None (no tumor decoder)."""
        return (*self.embed(images), None, None) if presence else (*self.embed(images), None)

    input_size = IMAGE_SIZE

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """A scan as this network reads it ((3, 224, 224), scaled by its range)."""
        from neurocbir.data.transforms import preprocess

        return preprocess(image)

    def embed_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable embeddings of preprocessed images (for similarity maps)."""
        return self.top(self.encoder.forward_stages(x, 0, self.top.cut))

    def embed_preprocessed(self, x: torch.Tensor) -> np.ndarray:
        """Embeddings of a batch of preprocessed images, no gradients (occlusion maps)."""
        with torch.inference_mode():
            return self.embed_tensor(x).numpy()

    def feature_layers(self) -> list[torch.nn.Module]:
        """The network's stages in order (feature-level maps read the last spatial output)."""
        return [*self.encoder.stages[: self.top.cut], *self.top.stages]


@dataclass
class LesionModel:
    """A trial of the lesion recipe: one network gives the embedding, the descriptor and the
    tumor probability (:class:`~neurocbir.models.lesion.LesionNet`)."""

    run: Path
    trial: int
    net: LesionNet
    config: TrainConfig
    checkpoint_sha256: str
    #: the embedding averaged over the scan and its left-right mirror (the run's ``mirror.json``,
    #: :mod:`neurocbir.models.mirror`), and so is the tumor map (the mirror's flipped back: its
    #: second view costs nothing more); the descriptor stays the scan's own
    mirror: bool = False

    @property
    def embedding_dim(self) -> int:
        return self.net.embedding_dim

    def _forward(
        self, images: list[np.ndarray], regions: list[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """``regions``: each scan's region to search by, on the input grid (S, S) in [0, 1]
        (:func:`neurocbir.data.regions.region_on_grid`); it replaces the predicted tumor in the pooling."""
        n = len(images)
        x = torch.stack([self.prepare(im) for im in images])
        r = None if regions is None else torch.from_numpy(np.stack(regions).astype(np.float32)[:, None])
        if self.mirror:  # one batch of both views
            x, r = with_mirror(x), None if r is None else with_mirror(r)
        emb, desc, logits = self._run(x, r)
        if self.mirror:  # the tumor logits of both views stay: analyse_batch averages their maps
            emb, desc = mean_of_views(emb, n), desc[:n]
        return emb, desc, logits

    def _run(self, x: torch.Tensor, r: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """The network on a preprocessed batch: compiled for this CPU, else PyTorch."""
        compiled = compile_net(self.net, self.config.image_size, self.checkpoint_sha256, region=r is not None)
        if compiled is not None:
            emb, desc, logits = compiled(x.numpy()) if r is None else compiled(x.numpy(), r.numpy())
            return emb, desc, torch.from_numpy(logits)
        with torch.inference_mode():
            emb, desc, logits = self.net(x.contiguous(memory_format=torch.channels_last), r)
        return emb.numpy(), desc.numpy(), logits

    def embed(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        emb, desc, _ = self._forward(images)
        return emb, desc

    @property
    def input_size(self) -> int:
        return self.config.image_size

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """A scan as this network reads it ((3, S, S), its run's size and intensity scaling)."""
        from neurocbir.data.transforms import preprocess

        return preprocess(image, self.config.image_size, self.config.intensity)

    def embed_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable embeddings of preprocessed images (for similarity maps)."""
        if not self.mirror:
            return self.net(x.contiguous(memory_format=torch.channels_last))[0]
        emb = self.net(with_mirror(x).contiguous(memory_format=torch.channels_last))[0]
        return F.normalize(emb[: len(x)] + emb[len(x) :], dim=1)

    def embed_preprocessed(self, x: torch.Tensor) -> np.ndarray:
        """Embeddings of a batch of preprocessed images through the CPU runtime (occlusion maps)."""
        emb = self._run(with_mirror(x) if self.mirror else x)[0]
        return mean_of_views(emb, len(x)) if self.mirror else emb

    def feature_layers(self) -> list[torch.nn.Module]:
        """The module whose output is the last spatial feature map (feature-level maps)."""
        return [self.net.neck]

    def similarity_contributions(
        self, x: torch.Tensor, target: torch.Tensor, halves: bool = False, region: np.ndarray | None = None
    ):
        """Each tumor-map cell's part of the similarity of ``x`` with ``target`` (similarity maps);
        ``region`` (S, S): a search by a drawn region."""
        from neurocbir.models.lesion import similarity_contributions

        r = None if region is None else torch.from_numpy(np.asarray(region, np.float32))[None, None]
        maps = similarity_contributions(self.net, x.contiguous(memory_format=torch.channels_last), target, True, r)
        if self.mirror:  # the mirror's maps, flipped back onto the scan; each view half the weight
            xm, rm = x.flip(-1).contiguous(memory_format=torch.channels_last), None if r is None else r.flip(-1)
            mirrored = similarity_contributions(self.net, xm, target, True, rm)
            maps = tuple((a + b.flip(-1)) / 2 for a, b in zip(maps, mirrored, strict=True))
        return maps if halves else maps[0] + maps[1]

    def analyse(
        self, image: np.ndarray, region: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(embedding, descriptor, tumor probability on the network's input grid (S, S); map it
        to the scan with :func:`neurocbir.models.lesion.tumor_outline`). ``region`` (S, S): pool
        the embedding over this region instead of over the predicted tumor."""
        emb, desc, probs = self.analyse_batch([image], None if region is None else [region])
        return emb, desc, probs[0]

    def analyse_batch(
        self, images: list[np.ndarray], regions: list[np.ndarray] | None = None, presence: bool = False
    ) -> tuple:
        """:meth:`analyse` of several scans in one pass (the slices of a series). ``presence``: a
        fourth item, each scan's tumor presence map on the same grid (its presence decoder's,
        :meth:`~neurocbir.models.lesion.LesionNet.add_presence_decoder`, where the network has
        one; its tumor map otherwise): its peak is the scan's tumor presence evidence."""
        emb, desc, logits = self._forward(images, regions)
        size = self.config.image_size
        prob = torch.sigmoid(F.interpolate(logits.float(), size=(size, size), mode="bilinear", align_corners=False))
        if self.mirror:  # the two views' maps, the mirror's flipped back onto the scan (chosen on
            # held-out slices: docs/results.md "The mirror's tumor map")
            prob = (prob[: len(images)] + prob[len(images) :].flip(-1)) / 2
        maps = [p[0].numpy() for p in prob]
        if not presence:
            return emb, desc, maps
        return emb, desc, maps, [p[-1].numpy() for p in prob]


def with_mirror(x: torch.Tensor) -> torch.Tensor:
    """(2B, ...): the batch, then each of its images mirrored left to right."""
    return torch.cat([x, x.flip(-1)])


def mean_of_views(emb: np.ndarray, n: int) -> np.ndarray:
    """(n, D): the L2-normalised mean of each scan's embedding and its mirror's (rows n..2n)."""
    both = emb[:n] + emb[n:]
    return both / np.maximum(np.linalg.norm(both, axis=1, keepdims=True), 1e-12)


def lesion_net(cfg: TrainConfig, state: dict) -> LesionNet:
    """A lesion checkpoint's network, float32 and unfused (with its presence decoder where the
    state holds one)."""
    arch = create_encoder(cfg.encoder, pretrained=False, embedding_dim=cfg.embedding_dim)
    net = LesionNet(arch, cfg.embedding_dim, cfg.head_hidden, cfg.dropout, cfg.decoder_stride)
    if any(k.startswith("presence_decoder.") for k in state):
        net.add_presence_decoder(branch=any(k.startswith("presence_decoder.trunk.") for k in state))
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return net


def load_model(
    run: Path | str, trial: int | None = None, encoder: Encoder | None = None, mirror: bool | None = None
) -> Model | LesionModel:
    """Load trial ``trial`` of ``run`` (default: the first trained one) for new images. A lesion
    run's embedding is averaged over the scan and its mirror where the run's ``mirror.json`` says
    so (``mirror``: either way, whatever it says)."""
    run = Path(run)
    trial = first_trial(run) if trial is None else trial
    ckpt = trial_dir(run, trial) / "checkpoint.pt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"{run} has no trial {trial} (no {ckpt})")
    try:  # weights_only: a checkpoint from someone else's run cannot execute code here
        blob = torch.load(ckpt, map_location="cpu", weights_only=True)
        cfg = TrainConfig(**blob["config"])
    except Exception as exc:  # torch raises many types on a corrupt or foreign file
        raise InvalidInput(f"{ckpt} is not a readable neurocbir checkpoint ({type(exc).__name__})") from None
    if cfg.recipe == "lesion":  # every weight is in the checkpoint: no pretrained weights needed
        net = fuse_for_inference(lesion_net(cfg, blob["state"])).to(memory_format=torch.channels_last)
        mirror = mirrored(run) if mirror is None else mirror
        return LesionModel(run, trial, net, cfg, checkpoint_sha256(run, trial, mirror), mirror)
    encoder = encoder or cfg.build_encoder()
    if encoder.weights.sha256 != blob["weights_sha256"]:
        raise InvalidInput(
            f"{run}: trained on weights {blob['weights_sha256'][:12]}, "
            f"but the encoder has {encoder.weights.sha256[:12]}"
        )
    top = Top(encoder, blob["cut"], len(CLASS_NAMES), with_mlp=cfg.loss == "ce")
    top.load_state_dict(blob["state"])
    return Model(run, trial, encoder.eval(), top.eval(), cfg, checkpoint_sha256(run, trial))


def trunk_descriptors(feats: np.ndarray) -> np.ndarray:
    """L2-normalised, spatially averaged frozen-trunk features of view 0: the space in which
    "is this scan like anything in the archive?" is judged (the trained embedding maps
    everything, even a photo of a cat, near some tumor class)."""
    x = np.asarray(feats[:, 0], dtype=np.float32)
    if x.ndim > 2:
        x = x.mean(axis=tuple(range(2, x.ndim)))
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embed_images(encoder: Encoder, top: Top, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and trunk descriptors of raw scans."""
    from neurocbir.data.transforms import preprocess

    x = torch.stack([preprocess(im) for im in images])
    with torch.inference_mode():
        feat = encoder.forward_stages(x, 0, top.cut)
        return top(feat).numpy(), trunk_descriptors(feat.numpy()[:, None])


@torch.inference_mode()
def embed_features(
    top: Top, feats: np.ndarray, device: torch.device, tta: bool = False, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray | None]:
    """L2-normalised embeddings (and CE class probabilities) of cached features (N, views, ...):
    view 0, or the mean over views with ``tta``."""
    top.eval()
    embs, probs = [], []
    views = range(feats.shape[1]) if tta else [0]
    for b in range(0, len(feats), batch_size):
        x = torch.from_numpy(np.asarray(feats[b : b + batch_size], dtype=np.float32)).to(device)
        raws = [top.raw(x[:, v]) for v in views]
        e = F.normalize(torch.stack([F.normalize(r, dim=1) for r in raws]).mean(0), dim=1)
        embs.append(e.cpu().numpy())
        if top.mlp is not None:
            probs.append(torch.stack([top.mlp(r).softmax(1) for r in raws]).mean(0).cpu().numpy())
    return np.concatenate(embs), (np.concatenate(probs) if probs else None)
