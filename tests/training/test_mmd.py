"""MMD with a Gaussian kernel against a direct numpy computation, and its behaviour on samples."""

import numpy as np
import pytest
import torch

from fastcnf.training.mmd import median_bandwidth, mmd2


def _numpy_mmd2(x, y, gamma, biased):
    """Double loops over the pairs, as the definition reads."""
    def k(a, b):
        return np.exp(-np.sum((a - b) ** 2) / (2 * gamma ** 2))

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if biased or i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if biased or i != j)
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m))
    if biased:
        return xx / n ** 2 + yy / m ** 2 - 2 * xy / (n * m)
    return xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2 * xy / (n * m)


def test_mmd_matches_the_definition_computed_directly():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(23, 3)), rng.normal(loc=0.4, size=(17, 3))
    pooled = np.concatenate([x, y])
    distances = [np.linalg.norm(pooled[i] - pooled[j]) for i in range(40) for j in range(i + 1, 40)]
    gamma = float(np.median(distances))
    assert median_bandwidth(x, y) == pytest.approx(gamma, rel=1e-12)
    for biased in (False, True):
        expected = _numpy_mmd2(x, y, gamma, biased)
        assert mmd2(x, y, biased=biased) == pytest.approx(expected, rel=1e-10)
        assert mmd2(torch.from_numpy(x).float(), y, bandwidth=0.7, biased=biased) == pytest.approx(
            _numpy_mmd2(x.astype(np.float32).astype(np.float64), y, 0.7, biased), rel=1e-6)


def test_mmd_separates_different_distributions_and_images_are_flattened():
    torch.manual_seed(0)
    same = mmd2(torch.randn(600, 2), torch.randn(600, 2))
    shifted = mmd2(torch.randn(600, 2), torch.randn(600, 2) + 0.5)
    assert abs(same) < 0.01 < shifted
    images = torch.rand(50, 8, 8)
    assert mmd2(images, images.reshape(50, 64).flip(0)) == pytest.approx(mmd2(images.reshape(50, 64),
                                                                              images.reshape(50, 64)))


@pytest.mark.parametrize("x, y, kwargs, message", [
    (np.zeros((1, 2)), np.zeros((5, 2)), {}, "x must be \\(N, ...\\) samples with N >= 2"),
    (np.zeros((4, 2)), np.zeros((5, 3)), {}, "same event size, got 2 and 3"),
    (np.zeros((4, 2)), np.zeros((5, 2)), {}, "bandwidth must be positive"),
    (np.ones((4, 2)), np.zeros((5, 2)), dict(bandwidth=-1.0), "bandwidth must be positive"),
])
def test_bad_mmd_input_is_named(x, y, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mmd2(x, y, **kwargs)
