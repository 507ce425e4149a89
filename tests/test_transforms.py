import numpy as np
import pytest
import torch

from neurocbir.data.transforms import augment, preprocess


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
