import numpy as np
import pytest
import torch

from neurocbir.data.transforms import INTENSITY, augment, preprocess


def test_preprocess_as_the_paper(cases):
    x = preprocess(cases.load_image(0))
    assert x.shape == (3, 224, 224)
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.99 and x.max() > 0.8  # scaled, then resized (antialiased)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_preprocess_rejects_bad_images():
    with pytest.raises(ValueError, match="2-D"):
        preprocess(np.zeros((4, 4, 4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        preprocess(np.full((32, 32), np.nan))
    assert (preprocess(np.full((32, 32), 7.0)) == 0).all()  # flat image: no division by zero


def test_augmented_copies_are_deterministic_and_distinct(cases):
    x = preprocess(cases.load_image(0))
    copies = [augment(x, c, seed=1) for c in (1, 2, 3)]
    for c, y in zip((1, 2, 3), copies):
        assert torch.equal(y, augment(x, c, seed=1))
        assert y.shape == x.shape and not torch.allclose(y, x)
    assert not torch.allclose(augment(x, 2, seed=1), augment(x, 2, seed=2))
    with pytest.raises(ValueError):
        augment(x, 0, seed=1)


def _exported(image: np.ndarray, window: float) -> np.ndarray:
    """The slice as another site's viewer exports it: windowed at the ``window`` share of its range
    (brighter pixels saturate) and saved as 8-bit."""
    unit = (image - image.min()) / (image.max() - image.min())
    return np.round(np.clip(unit / window, 0, 1) * 255).astype(np.uint8)


@pytest.mark.parametrize("i", [0, 5, 11])
def test_head_scaling_sees_a_windowed_export_as_the_same_scan(cases, i):
    """A few bright pixels set a slice's range; an export windowed below them brightens the whole
    brain. Scaled by its range, the export reads differently from the original; scaled inside the
    head, the two read alike."""
    image = cases.load_image(i).astype(np.float32)
    window = float(np.percentile((image - image.min()) / (image.max() - image.min()), 99.8))
    copy = _exported(image, window)
    gap = {
        how: float((preprocess(image, intensity=how) - preprocess(copy, intensity=how)).abs().mean())
        for how in INTENSITY
    }
    print(f"slice {i}: window {window:.2f}, mean gap {gap}")
    assert gap["head"] < 0.02 < gap["minmax"]
    assert gap["head"] < gap["minmax"] / 3


def test_head_scaling_keeps_black_black_and_flat_images_flat(cases):
    x = preprocess(cases.load_image(0), intensity="head")
    assert x.min() == -1 and x.max() == 1 and (x == 1).float().mean() < 0.02  # about 1 % of the head saturates
    assert (preprocess(np.full((32, 32), 7.0), intensity="head") == 0).all()
    dark = np.zeros((64, 64), np.float32)
    dark[30, 30] = 1.0  # a lone bright pixel: too little head to set a window, scaled by its range
    assert torch.equal(preprocess(dark, intensity="head"), preprocess(dark))
    with pytest.raises(ValueError, match="intensity"):
        preprocess(dark, intensity="zscore")
