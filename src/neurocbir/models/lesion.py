"""Lesion-aware encoder: the whole CNN, a light tumor-segmentation decoder on its feature
pyramid, and an embedding pooled both over the slice and over the predicted tumor.

Why: a whole-slice embedding matches slice level and anatomy (a posterior meningioma retrieved
skull-base pituitary slices); what separates the classes is the lesion's own appearance. The
masks are used only in training (the segmentation loss); at query time the network predicts
the tumor itself, which also gives the query's outline and area.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from neurocbir.errors import ConfigurationError, InvalidInput
from neurocbir.models.encoders import Encoder

DECODER_CHANNELS = 64
FINE_CHANNELS = 16  # the stride-2 refinement: few channels, as it runs on 4x the cells
#: strides of the trunk outputs the decoder reads (the finest sets the mask's resolution)
TAP_STRIDES = (4, 8, 16, 32)
#: strides the tumor map can have: 4 (the feature pyramid) or 2 (plus the stride-2 refinement)
DECODER_STRIDES = (4, 2)


def _taps(stages: nn.ModuleList, strides: tuple[int, ...], size: int = 64) -> tuple[list[int], list[int]]:
    """Index of the last stage at each of ``strides``, and its channels."""
    x = torch.zeros(1, 3, size, size)
    last: dict[int, tuple[int, int]] = {}
    with torch.no_grad():
        was_training = stages.training
        stages.eval()
        for i, stage in enumerate(stages):
            x = stage(x)
            last[size // x.shape[-1]] = (i, x.shape[1])
        stages.train(was_training)
    missing = [s for s in strides if s not in last]
    if missing:
        raise ValueError(f"backbone has no stage at stride {missing}")
    return [last[s][0] for s in strides], [last[s][1] for s in strides]


def _pool_to(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Adaptive average pooling to ``size``; a plain average pool when the sizes divide (the same
    numbers, and exportable to ONNX with a constant kernel)."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if h % size[0] == 0 and w % size[1] == 0:
        return F.avg_pool2d(x, (h // int(size[0]), w // int(size[1])))
    return F.adaptive_avg_pool2d(x, size)


class LesionNet(nn.Module):
    """``forward(x)`` -> (embedding (B, dim) L2-normalised, descriptor (B, C) L2-normalised,
    tumor logits (B, 1, H/s, W/s), s = ``decoder_stride``; a second channel, the presence
    decoder's, where :meth:`add_presence_decoder` gave it one).

    With ``decoder_stride`` 2 the stride-4 pyramid output is refined with the stride-2 trunk
    features (a few channels), so small tumors (a few stride-4 cells) get sharper outlines.

    The embedding head reads [mean of the last feature map, its mean weighted by the predicted
    tumor probability]; the descriptor (the first half) is what "unlike the archive" is judged on.
    """

    def __init__(
        self,
        encoder: Encoder,
        embedding_dim: int = 128,
        head_hidden: int = 512,
        dropout: float = 0.3,
        decoder_stride: int = 4,
    ):
        super().__init__()
        import copy

        stages = copy.deepcopy(encoder.stages)
        self.trunk = nn.ModuleList(stages[:-1])
        neck = stages[-1]  # conv_head, bn(+act), global pool (EfficientNet); a pool alone (ResNet)
        self.neck = nn.Sequential(*list(neck.children())[:-1]) if isinstance(neck, nn.Sequential) else nn.Identity()
        if decoder_stride not in DECODER_STRIDES:
            raise InvalidInput(f"decoder_stride must be one of {DECODER_STRIDES}, got {decoder_stride}")
        self.taps, channels = _taps(self.trunk, TAP_STRIDES)
        self.fine_tap: int | None = None  # the trunk stage the stride-2 refinement reads
        self.lateral = nn.ModuleList(nn.Conv2d(c, DECODER_CHANNELS, 1) for c in channels)
        # with stride 2 the head's output is features for the refinement (before upsampling: 4x fewer cells)
        self.mask_head = nn.Sequential(
            nn.Conv2d(DECODER_CHANNELS, DECODER_CHANNELS, 3, padding=1, bias=False),
            nn.BatchNorm2d(DECODER_CHANNELS),
            nn.ReLU(inplace=True),
            nn.Conv2d(DECODER_CHANNELS, 1 if decoder_stride == 4 else FINE_CHANNELS, 1),
        )
        if decoder_stride == 2:
            (self.fine_tap,), (fine_channels,) = _taps(self.trunk, (2,))
            self.fine_lateral = nn.Conv2d(fine_channels, FINE_CHANNELS, 1)
            self.fine_head = nn.Sequential(
                nn.Conv2d(FINE_CHANNELS, FINE_CHANNELS, 3, padding=1, bias=False),
                nn.BatchNorm2d(FINE_CHANNELS),
                nn.ReLU(inplace=True),
                nn.Conv2d(FINE_CHANNELS, 1, 1),
            )
        self.num_features = encoder.num_features
        self.embedding_dim = embedding_dim
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(2 * self.num_features, head_hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(head_hidden, embedding_dim),
        )

    def add_presence_decoder(self, branch: bool = False) -> LesionNet:
        """A second tumor decoder, a copy of the first, whose peak says whether the slice shows a
        tumor (``neurocbir.training.presence_decoder`` trains it on the frozen network): the outline
        and the embedding stay the first decoder's. With it, :meth:`forward`'s tumor logits have a
        second channel, the presence decoder's. ``branch``: it also gets its own copy of the trunk's
        stages after stride 8 (its stride-16 and -32 features; the stages up to stride 8 stay shared)."""
        import copy

        names = ("lateral", "mask_head", "fine_lateral", "fine_head")
        self.presence_decoder = nn.ModuleDict({n: copy.deepcopy(getattr(self, n)) for n in names if hasattr(self, n)})
        if branch:
            start = self.taps[1] + 1
            self.presence_decoder["trunk"] = copy.deepcopy(self.trunk[start : self.taps[-1] + 1])
        return self

    @property
    def has_presence_decoder(self) -> bool:
        return "presence_decoder" in self._modules

    def frozen_stages(self, stride: int) -> int:
        """How many trunk stages end at or before output ``stride`` (0 for stride 0)."""
        return self.taps[TAP_STRIDES.index(stride)] + 1 if stride else 0

    def forward(
        self, x: torch.Tensor, region: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embedding, descriptor, tumor logits). ``region`` (B, 1, h, w) in [0, 1]: a region to
        search by, whose share of each cell takes the predicted tumor's place in the pooling."""
        fmap, feats, fine = self.trunk_features(x)
        logits = self.decode(feats, fine)
        emb, desc = self.embed(fmap, logits, region)
        if self.has_presence_decoder:
            logits = torch.cat([logits, self.decode(feats, fine, presence=True)], dim=1)
        return emb, desc, logits

    def embed(
        self, fmap: torch.Tensor, logits: torch.Tensor, region: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding, descriptor) of a feature map pooled with its tumor logits (or a region)."""
        context, lesion, _ = self.pool(fmap, logits, region)
        emb = self.head(torch.cat([context, lesion], dim=1))
        return F.normalize(emb.float(), dim=1), F.normalize(context.float(), dim=1)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(last feature map (B, C, H/32, W/32), tumor logits (B, 1, H/s, W/s))."""
        fmap, feats, fine = self.trunk_features(x)
        return fmap, self.decode(feats, fine)

    def trunk_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """(last feature map, the trunk stages the decoder reads, the stride-2 stage or None)."""
        feats, fine = [], None
        for i, stage in enumerate(self.trunk):
            x = stage(x)
            if i == self.fine_tap:
                fine = x
            if i in self.taps:
                feats.append(x)
        return self.neck(x), feats, fine

    def decode(self, feats: list[torch.Tensor], fine: torch.Tensor | None, presence: bool = False) -> torch.Tensor:
        """Tumor logits (B, 1, H/s, W/s) from the trunk stages ``trunk_features`` returns (of the
        presence decoder with ``presence``)."""
        d = self.presence_decoder if presence else self
        if presence and "trunk" in d:
            feats = self._branch(d["trunk"], feats)
        y = d.lateral[-1](feats[-1])
        for lat, f in zip(reversed(d.lateral[:-1]), reversed(feats[:-1])):
            y = F.interpolate(y, size=f.shape[-2:], mode="bilinear", align_corners=False) + lat(f)
        logits = d.mask_head(y)
        if fine is not None:  # the stride-4 output is features here, refined at stride 2
            up = F.interpolate(logits, size=fine.shape[-2:], mode="bilinear", align_corners=False)
            logits = d.fine_head(up + d.fine_lateral(fine))
        return logits

    def _branch(self, stages: nn.ModuleList, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """The decoder's inputs with the stride-16 and -32 features of the presence decoder's own
        trunk stages (run from the shared stride-8 features)."""
        x, out, start = feats[1], list(feats[:2]), self.taps[1] + 1
        for i, stage in enumerate(stages, start):
            x = stage(x)
            if i in self.taps[2:]:
                out.append(x)
        return out

    @staticmethod
    def pool(
        fmap: torch.Tensor, logits: torch.Tensor, region: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(context: the feature map's mean, lesion: its mean weighted by the tumor probability
        pooled to the feature map's cells, that weight's sum + 1e-3 (the lesion mean's divisor)).
        With a ``region`` (B, 1, h, w) in [0, 1] the region's share of each cell is the weight."""
        weight = torch.sigmoid(logits.float()) if region is None else region.float()
        weight = _pool_to(weight, fmap.shape[-2:]).to(fmap.dtype)
        total = weight.sum(dim=(2, 3)) + 1e-3
        return fmap.mean(dim=(2, 3)), (fmap * weight).sum(dim=(2, 3)) / total, total


def similarity_contributions(
    net: LesionNet, x: torch.Tensor, target: torch.Tensor, halves: bool = False, region: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(1, 1, H/s, W/s): how much each cell of the tumor map's grid adds to the similarity of the
    scan ``x`` (1, 3, H, W) with the embedding ``target`` (1, D), by the network's own structure;
    with ``halves``, the context half's and the lesion half's maps apart (their sum is the map).

    Why: the embedding is a ReLU MLP on [mean of the feature map, its tumor-weighted mean], so on
    the scan's linear piece the similarity ``head(z) . target`` is ``g . z`` plus biases, with
    ``g`` its gradient in ``z``. ``g . z`` splits exactly over locations (Stylianou et al. 2019's
    similarity decomposition for pooled embeddings): the context half over the feature map's
    cells (each spread over the pixels it covers), the lesion half over the tumor map's cells in
    proportion to their tumor probability. Unlike a gradient of the distance, which is about what
    would make two near cases nearer, this says where their similarity comes from; the sum of the
    map is the (unnormalised) similarity less the biases' part (exactly when the tumor map's side
    is a multiple of the feature map's, as at 224 and 256 px; about, otherwise). With a
    ``region`` (a search by a drawn region, (1, 1, S, S)), the region's share takes the tumor
    probability's place."""
    with torch.no_grad():
        fmap, logits = net.features(x)
        fmap, prob = fmap.float(), torch.sigmoid(logits.float())
        if region is not None:
            prob = _pool_to(region.float(), prob.shape[-2:])
        context, lesion, total = net.pool(fmap, logits, region)
    z = torch.cat([context, lesion], dim=1).requires_grad_(True)
    target = target.clone()  # an inference-mode tensor cannot be saved for backward; its copy here can
    with torch.enable_grad():
        (grad,) = torch.autograd.grad((net.head(z) * target).sum(), z)
    g_context, g_lesion = grad.split(fmap.shape[1], dim=1)
    cells = fmap.shape[-2] * fmap.shape[-1]
    per_cell_context = torch.einsum("bc,bchw->bhw", g_context, fmap)[:, None] / cells
    per_cell_lesion = torch.einsum("bc,bchw->bhw", g_lesion, fmap)[:, None]
    pixels_per_cell = prob.shape[-2] * prob.shape[-1] / cells

    def spread(per_cell: torch.Tensor) -> torch.Tensor:  # a cell's part, shared by the pixels it covers
        return F.interpolate(per_cell, size=prob.shape[-2:], mode="nearest") / pixels_per_cell

    # the pooled weight of a cell is its pixels' mean probability: pixel k carries p_k / pixels_per_cell
    context_map, lesion_map = spread(per_cell_context), prob * spread(per_cell_lesion) / total[:, :, None, None]
    return (context_map, lesion_map) if halves else context_map + lesion_map


def fuse_for_inference(net: LesionNet) -> LesionNet:
    """Fold every batch norm into the convolution before it (timm EfficientNet blocks, stem,
    neck, decoder), in place: the same outputs (to 1e-6) about 17 % faster on a CPU.
    Inference only: the folded network cannot be trained."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def act(bn: nn.Module) -> nn.Module:  # timm's BatchNormAct2d carries its activation
        return nn.Sequential(bn.drop, bn.act) if hasattr(bn, "act") else nn.Identity()

    pairs = {
        DepthwiseSeparableConv: (("conv_dw", "bn1"), ("conv_pw", "bn2")),
        InvertedResidual: (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
    }
    net.eval()
    for module in list(net.modules()):
        for conv, bn in pairs.get(type(module), ()):
            setattr(module, conv, fuse_conv_bn_eval(getattr(module, conv), getattr(module, bn)))
            setattr(module, bn, act(getattr(module, bn)))
        if isinstance(module, nn.Sequential):
            children = list(module.children())
            for i in range(len(children) - 1):
                if isinstance(children[i], nn.Conv2d) and isinstance(children[i + 1], nn.BatchNorm2d):
                    module[i] = fuse_conv_bn_eval(children[i], children[i + 1])
                    module[i + 1] = act(children[i + 1])
    return net


#: In-plane pixel side of the dataset's 512 px slices (Cheng et al. 2015): assumed for scans
#: that carry no pixel spacing (PNG, JPEG, .mat)
DATASET_SPACING_MM_AT_512 = 0.49
MIN_TUMOR_MM2 = 10.0  # smaller predicted regions are noise, not a tumor
MAX_OUTLINE_POINTS = 200
TUMOR_LEVEL_FILE = "tumor_level.json"  # a run's outline level, chosen on held-out training patients


def tumor_level(run: Path | str) -> float:
    """The run's outline level (0.5 unless chosen on held-out training patients)."""
    path = Path(run) / TUMOR_LEVEL_FILE
    try:
        return float(json.loads(path.read_text())["level"]) if path.is_file() else 0.5
    except (ValueError, KeyError, TypeError):
        raise ConfigurationError(f"{path} is corrupt: delete it to outline at probability 0.5") from None


def tumor_outline(
    prob: np.ndarray,
    image_shape: tuple[int, int] | None = None,
    pixel_spacing_mm: tuple[float, float] | None = None,
    level: float = 0.5,
) -> dict | None:
    """The predicted tumor of a scan: outline (x, y in the scan's pixels) and area of the
    largest connected region where ``prob`` >= ``level``; None when no tumor is found.
    ``prob`` may be on a coarser grid than the scan (``image_shape``, default: the same).
    Without a pixel spacing, the dataset's (0.49 mm at 512 px) is assumed and said so."""
    from skimage import measure

    rows, cols = image_shape or prob.shape
    sy, sx = rows / prob.shape[0], cols / prob.shape[1]  # scan pixels per map cell
    assumed = pixel_spacing_mm is None
    if assumed:
        side = DATASET_SPACING_MM_AT_512 * 512 / max(rows, cols)
        pixel_spacing_mm = (side, side)
    regions = measure.label(prob >= level)
    if regions.max() == 0:
        return None
    sizes = np.bincount(regions.ravel())[1:]
    largest = regions == 1 + int(np.argmax(sizes))
    area = float(largest.sum() * sy * sx * pixel_spacing_mm[0] * pixel_spacing_mm[1])
    if area < MIN_TUMOR_MM2:
        return None
    contour = max(measure.find_contours(np.pad(largest, 1).astype(np.float32), 0.5), key=len) - 1
    contour = contour[:: -(-len(contour) // MAX_OUTLINE_POINTS)]  # at most MAX_OUTLINE_POINTS points
    return {
        "area_mm2": round(area, 1),
        # cell centres to scan pixel coordinates
        "outline": np.round((contour[:, ::-1] + 0.5) * (sx, sy) - 0.5, 1).tolist(),
        "image_size": [int(rows), int(cols)],  # rows, columns the outline refers to
        "pixel_spacing_mm": [round(float(s), 4) for s in pixel_spacing_mm],
        "spacing_assumed": assumed,
        "note": "estimated from the predicted tumor outline"
        + (
            f"; pixel spacing assumed {pixel_spacing_mm[0]:.3f} mm (the dataset's 0.49 mm at 512 px)" if assumed else ""
        ),
    }
