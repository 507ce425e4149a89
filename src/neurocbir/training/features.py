"""Feature cache: run the frozen bottom of the trunk once over every case and its fixed
augmented copies, and keep the outputs on disk (float16 ``.npy`` beside a JSON manifest).

Training then touches only the unfrozen top, over many epochs, losses and trials.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from neurocbir.data.cases import CaseTable
from neurocbir.data.transforms import IMAGE_SIZE, augment, preprocess
from neurocbir.files import atomic_write, default_cache_dir, write_json
from neurocbir.models.encoders import Encoder

AUG_VERSION = 1  # bump when transforms.augment changes


def case_views(table: CaseTable, i: int, n_copies: int) -> torch.Tensor:
    """(1 + n_copies, 3, H, W): the preprocessed image and its deterministic augmented copies."""
    x = preprocess(table.load_image(i))
    seed = int(table.idx[i])
    return torch.stack([x] + [augment(x, c, seed) for c in range(1, n_copies + 1)])


def _key(table: CaseTable, encoder: Encoder, cut: int, n_copies: int) -> str:
    spec = {
        "encoder": encoder.name,
        "weights": encoder.weights.sha256,
        "cut": cut,
        "n_copies": n_copies,
        "image_size": IMAGE_SIZE,
        "aug_version": AUG_VERSION,
        "source": table.loader.name,
        "root": str(getattr(table.loader, "root", "")),
        "cases": hashlib.sha256(table.idx.astype(np.int64).tobytes()).hexdigest()[:16],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def cached_features(
    table: CaseTable,
    encoder: Encoder,
    cuts: list[int],
    n_copies: int = 2,
    cache_dir: Path | None = None,
    batch_size: int = 16,
    device: torch.device | None = None,
    only_if_cached: bool = False,
) -> dict[int, np.ndarray]:
    """Features at each stage boundary in ``cuts`` for every case: ``{cut: (N, 1+n_copies, ...)}``.

    Computed once per (encoder weights, cut, copies, cases) and memory-mapped afterwards.
    Cut 0 is the preprocessed images themselves (full fine-tuning, meant for a GPU).
    """
    cache = Path(cache_dir or default_cache_dir()) / "features"
    cache.mkdir(parents=True, exist_ok=True)
    paths = {c: cache / f"{_key(table, encoder, c, n_copies)}.npy" for c in cuts}
    out = {c: np.load(p, mmap_mode="r") for c, p in paths.items() if p.is_file()}
    todo = sorted(c for c in cuts if c not in out)
    if not todo or only_if_cached:
        return out
    device = device or torch.device("cpu")
    encoder = encoder.to(device).eval()
    views = 1 + n_copies
    buffers: dict[int, np.ndarray] = {}
    start = time.time()
    order = list(range(len(table)))
    step = max(1, batch_size // views)
    with torch.inference_mode():
        for b0 in tqdm(range(0, len(order), step), desc=f"caching features (cuts {todo})", unit="batch"):
            rows = order[b0 : b0 + step]
            x = torch.cat([case_views(table, i, n_copies) for i in rows]).to(device)
            prev = 0
            for c in todo:
                x = encoder.forward_stages(x, prev, c)
                prev = c
                feat = x.float().cpu().numpy().astype(np.float16)
                if c not in buffers:
                    buffers[c] = np.empty((len(table), views, *feat.shape[1:]), dtype=np.float16)
                buffers[c][rows] = feat.reshape(len(rows), views, *feat.shape[1:])
    for c in todo:
        atomic_write(paths[c], lambda tmp, a=buffers[c]: np.save(tmp, a))
        meta = {
            "cut": c,
            "shape": list(buffers[c].shape),
            "encoder": encoder.name,
            "weights": encoder.weights.source,
            "n_copies": n_copies,
            "seconds": round(time.time() - start, 1),
        }
        write_json(paths[c].with_suffix(".json"), meta)
        out[c] = np.load(paths[c], mmap_mode="r")
    return out
