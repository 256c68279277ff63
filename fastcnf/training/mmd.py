"""Maximum mean discrepancy between two samples, with a Gaussian kernel.

    MMD^2(P, Q) = E k(x, x') + E k(y, y') - 2 E k(x, y),   k(a, b) = exp(-|a - b|^2 / (2 gamma^2))

estimated from x (N, D) ~ P and y (M, D) ~ Q. The unbiased estimator (default) leaves the
diagonal terms k(x_i, x_i) = 1 out of the two within-sample means (it can be slightly negative);
``biased=True`` keeps them (the V-statistic, >= 0). The bandwidth gamma defaults to the median
heuristic: the median distance between distinct points of the pooled sample. JKO-iFlow's code
(hamrel-cxu/JKO-iFlow) uses the biased estimate with 0.1 x the median of the reference sample's
distances; pass ``bandwidth`` to reproduce such a setting.

Memory is O((N + M)^2) floats; subsample large sets first (a few thousand points each).
"""

import numpy as np
import torch

__all__ = ["mmd2", "median_bandwidth"]


def _flat(points, name):
    points = torch.as_tensor(points)
    if points.ndim < 2 or points.shape[0] < 2:
        raise ValueError(f"{name} must be (N, ...) samples with N >= 2, got shape {tuple(points.shape)}.")
    return points.reshape(points.shape[0], -1).double()


def median_bandwidth(x, y):
    """The median of |a - b| over distinct pairs of points of the pooled sample (x, y) as a float."""
    pooled = torch.cat([_flat(x, "x"), _flat(y, "y")])
    return float(np.median(torch.pdist(pooled).cpu().numpy()))  # the mean of the middle two for an even count


def mmd2(x, y, bandwidth=None, biased=False):
    """Estimate of MMD^2 between the samples ``x`` (N, ...) and ``y`` (M, ...) as a float.

    ``bandwidth``: gamma of the Gaussian kernel (default ``median_bandwidth(x, y)``).
    """
    x, y = _flat(x, "x"), _flat(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same event size, got {x.shape[1]} and {y.shape[1]}.")
    gamma = median_bandwidth(x, y) if bandwidth is None else float(bandwidth)
    if not gamma > 0:
        raise ValueError(f"bandwidth must be positive, got {gamma!r} (identical points?).")

    def kernel_sum(a, b):
        return torch.exp(-torch.cdist(a, b).pow(2) / (2.0 * gamma ** 2)).sum()

    n, m = x.shape[0], y.shape[0]
    within_x, within_y, across = kernel_sum(x, x), kernel_sum(y, y), kernel_sum(x, y)
    if biased:
        value = within_x / n ** 2 + within_y / m ** 2 - 2.0 * across / (n * m)
    else:  # the diagonals contribute exp(0) = 1 each
        value = (within_x - n) / (n * (n - 1)) + (within_y - m) / (m * (m - 1)) - 2.0 * across / (n * m)
    return float(value)
