"""Why is this case similar? A similarity map: which parts of a scan bring its embedding
close to another case's (X-MIR's similarity-based saliency).

For lesion models the default is the similarity itself split over the scan's locations by the
network's structure (:func:`neurocbir.models.lesion.similarity_contributions`, after Stylianou et al.
2019): exact, one forward pass, and it says where the similarity comes from. The alternatives,
kept for models without a tumor map and for the comparison: attributions of the negative
squared embedding distance on the pixels (|gradient|, |gradient x input|, |gradient x (input -
black)|, its positive part, the last with SmoothGrad's gradient averaged over noisy copies of
the scan), on the last feature map (Grad-CAM, gradient x activation), or occlusion. The
attribution and the smoothing (5 or 10 px at 512) are chosen on training-patient queries and
their nearest case of another patient, by the pointing game
(``benchmarks/similarity_maps.py --select``); the test fold only reports. Every map is smoothed
and scaled to [0, 1] at the scan's own pixel size."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F

from neurocbir.errors import InvalidInput

SMOOTH_SIGMA = 5 / 512  # of the image side


ATTRIBUTIONS = {
    "grad": lambda g, x: g.abs(),
    "grad_x_input": lambda g, x: (g * x).abs(),
    "grad_x_input_from_black": lambda g, x: (g * (x + 1)).abs(),  # black (-1) contributes nothing
    "positive_grad_x_input_from_black": lambda g, x: (g * (x + 1)).clamp(min=0),
}
# on the network's last feature map (stride 32) instead of the pixels: coarser, and about where
# the embedding reads (Grad-CAM, and gradient x activation, for a distance instead of a class)
FEATURE_ATTRIBUTIONS = {
    "gradcam": lambda g, a: (g.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True).clamp(min=0),
    "grad_x_activation": lambda g, a: (g * a).sum(1, keepdim=True).clamp(min=0),
}
#: occlusion (X-MIR's other family): a black square slid over the scan; a pixel's value is how
#: much farther from the other case the scan gets, on average, while it is hidden. One forward
#: pass per position (batched through the CPU runtime), no gradients.
OCCLUSION = "occlusion"
OCCLUSION_PATCH, OCCLUSION_STRIDE = 1 / 7, 1 / 14  # of the network's input side
#: SmoothGrad (Smilkov et al. 2017): the gradient averaged over copies of the scan with Gaussian
#: noise (this standard deviation, on the [-1, 1] input), then x (input - black). One batched
#: forward and backward pass of SMOOTHGRAD_SAMPLES copies; a fixed seed, so a map is reproducible.
SMOOTHGRAD = {f"smoothgrad_x_input_from_black_noise_{n}": n for n in (0.05, 0.1, 0.2)}
SMOOTHGRAD_SAMPLES = 8
#: the similarity itself split over locations by the network's structure (lesion models only:
#: :func:`neurocbir.models.lesion.similarity_contributions`); its positive part, on the tumor map's grid
DECOMPOSITION = "similarity_decomposition"
#: for models that pool over no tumor map (the cached recipe), and the lesion models' runner-up
FALLBACK_ATTRIBUTION = "smoothgrad_x_input_from_black_noise_0.1"
ATTRIBUTION = DECOMPOSITION  # lesion models


def default_attribution(model) -> str:
    """The attribution chosen on training patients, when ``model`` can give it."""
    return ATTRIBUTION if hasattr(model, "similarity_contributions") else FALLBACK_ATTRIBUTION


def occlusion_map(model, x: torch.Tensor, target: np.ndarray, batch: int = 32) -> torch.Tensor:
    """(1, 1, S, S) occlusion map of a preprocessed scan ``x`` (1, 3, S, S) towards ``target``."""
    size = x.shape[-1]
    patch, stride = max(1, round(size * OCCLUSION_PATCH)), max(1, round(size * OCCLUSION_STRIDE))
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    corners = [(r, c) for r in starts for c in starts]
    base = float(((model.embed_preprocessed(x) - target) ** 2).sum())
    heat, count = torch.zeros(size, size), torch.zeros(size, size)
    for b in range(0, len(corners), batch):
        chunk = corners[b : b + batch]
        xs = x.repeat(len(chunk), 1, 1, 1)
        for i, (r, c) in enumerate(chunk):
            xs[i, :, r : r + patch, c : c + patch] = -1.0  # black
        farther = ((model.embed_preprocessed(xs) - target) ** 2).sum(1) - base
        for (r, c), d in zip(chunk, farther):
            heat[r : r + patch, c : c + patch] += max(float(d), 0.0)
            count[r : r + patch, c : c + patch] += 1
    return (heat / count.clamp(min=1))[None, None]


def similarity_map(
    model, image: np.ndarray, other: np.ndarray, attribution: str | None = None, sigma: float = SMOOTH_SIGMA
) -> np.ndarray:
    """(H, W) map in [0, 1] over ``image``: where it looks like ``other`` to ``model``
    (a :class:`neurocbir.models.inference.Model` or ``LesionModel``); ``attribution`` defaults to
    :func:`default_attribution`."""
    attribution = attribution or default_attribution(model)
    return scan_map(attribution_map(model, image, other, attribution), image.shape[:2], sigma)


def similarity_halves(
    model,
    image: np.ndarray,
    other: np.ndarray,
    region: np.ndarray | None = None,
    other_region: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decomposed similarity of ``image`` with ``other`` on the tumor map's grid, as its
    whole-slice half and its tumor-weighted half ((1, 1, s, s) each; lesion models only).
    ``region`` / ``other_region`` (S, S): the side searched by a drawn region pools over it."""
    if not hasattr(model, "similarity_contributions"):
        raise InvalidInput(f"{DECOMPOSITION} needs a lesion model (its embedding pools over the tumor map)")
    if other_region is not None:
        target = torch.from_numpy(model.analyse(other, other_region)[0])
    else:
        with torch.inference_mode():
            target = model.embed_tensor(model.prepare(other)[None]).clone()
    x = model.prepare(image)[None]
    if region is None:
        return model.similarity_contributions(x, target, halves=True)
    return model.similarity_contributions(x, target, halves=True, region=region)


def _lesion_part(context: torch.Tensor, lesion: torch.Tensor) -> float | None:
    total = float(context.sum() + lesion.sum())
    return min(max(float(lesion.sum()) / total, 0.0), 1.0) if total > 0 else None


def lesion_share(model, image: np.ndarray, other: np.ndarray) -> float | None:
    """The part of ``image``'s similarity with ``other`` that comes from the embedding's
    tumor-weighted half (the rest: its whole-slice half), in [0, 1]; None for a model without a
    tumor map, or when the two are not similar at all (nothing to split). Tells a reader whether a
    match is about the lesion or about the slice around it."""
    if not hasattr(model, "similarity_contributions"):
        return None
    return _lesion_part(*similarity_halves(model, image, other))


def explain_similarity(
    model,
    image: np.ndarray,
    other: np.ndarray,
    region: np.ndarray | None = None,
    other_region: np.ndarray | None = None,
) -> tuple[np.ndarray, float | None]:
    """(:func:`similarity_map` with the default attribution, :func:`lesion_share`), from one
    pass through the network where the map is the decomposed similarity; ``region`` /
    ``other_region``: a drawn region that side was searched by (its half then reads the region)."""
    if default_attribution(model) != DECOMPOSITION:
        if region is not None or other_region is not None:
            raise InvalidInput("similarity maps of a region search need a lesion model")
        return similarity_map(model, image, other), None
    context, lesion = similarity_halves(model, image, other, region, other_region)
    sal = scan_map((context + lesion).clamp(min=0), image.shape[:2], SMOOTH_SIGMA)
    return sal, _lesion_part(context, lesion)


def attribution_map(model, image: np.ndarray, other: np.ndarray, attribution: str) -> torch.Tensor:
    """The raw (1, 1, s, s) attribution on the network's grid, before smoothing and scaling."""
    if attribution == DECOMPOSITION:
        context, lesion = similarity_halves(model, image, other)
        return (context + lesion).clamp(min=0)
    x = model.prepare(image)[None]
    if attribution == OCCLUSION:
        return occlusion_map(model, x, model.embed_preprocessed(model.prepare(other)[None]))
    with torch.inference_mode():
        target = model.embed_tensor(model.prepare(other)[None]).clone()
    noise = SMOOTHGRAD.get(attribution)
    if noise is None:
        xs = x.clone()
    else:
        shape = (SMOOTHGRAD_SAMPLES, *x.shape[1:])
        xs = (x + noise * torch.randn(shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    xs.requires_grad_(True)
    features: list[torch.Tensor] = []  # the outputs of the network's stages; the last 4-D one is the map
    on_features = attribution in FEATURE_ATTRIBUTIONS

    def keep(module, inputs, out):
        if isinstance(out, torch.Tensor) and out.ndim == 4:
            features.append(out)

    hooks = [m.register_forward_hook(keep) for m in model.feature_layers()] if on_features else []
    try:
        with torch.enable_grad():
            emb = model.embed_tensor(xs)
            closeness = -((emb - target) ** 2).sum()
            (grad,) = torch.autograd.grad(closeness, [features[-1] if on_features else xs])
    finally:
        for h in hooks:
            h.remove()
    if on_features:
        return FEATURE_ATTRIBUTIONS[attribution](grad.float(), features[-1].detach().float())
    if noise is not None:
        grad, attribution = grad.mean(0, keepdim=True), "grad_x_input_from_black"
    return ATTRIBUTIONS[attribution](grad, x).sum(1, keepdim=True).detach()


def scan_map(sal: torch.Tensor, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """A (1, 1, s, s) map at the scan's own size, smoothed, scaled to [0, 1]."""
    from scipy.ndimage import gaussian_filter

    sal = F.interpolate(sal.float(), size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()
    sal = gaussian_filter(sal, sigma * max(shape))
    top = float(sal.max())
    return sal / top if top > 0 else np.zeros_like(sal)


def heat_png(sal: np.ndarray) -> bytes:
    """The map as an RGBA PNG (inferno colours, transparent where cold) to lay over the scan."""
    from matplotlib import colormaps
    from PIL import Image

    top = float(np.percentile(sal, 99.5))  # display stretch: the hottest 0.5 % saturate
    shown = np.clip(sal / top, 0, 1) if top > 0 else np.zeros_like(sal)
    rgba = (colormaps["inferno"](shown) * 255).astype(np.uint8)
    rgba[..., 3] = (np.clip(shown * 1.4, 0, 1) * 200).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def mass_inside(sal: np.ndarray, mask: np.ndarray, dilate_px: int = 15) -> tuple[float, bool]:
    """(share of the map's mass inside the tumor dilated by ``dilate_px``, whether the hottest
    pixel is inside it): how the maps are judged against the masks."""
    from scipy.ndimage import binary_dilation

    region = binary_dilation(mask, iterations=dilate_px) if dilate_px else mask
    total = float(sal.sum())
    share = float(sal[region].sum()) / total if total > 0 else 0.0
    hottest = np.unravel_index(int(np.argmax(sal)), sal.shape)
    return share, bool(region[hottest])
