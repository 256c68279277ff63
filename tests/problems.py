"""Test problems with known solutions and small helpers shared by the solver tests.

Every problem is a plain ``func(t, y)`` plus its exact solution (or a way to get one), so
tests can measure true errors rather than compare two solvers with each other.
"""

import math

import numpy as np
import scipy.linalg
import torch

__all__ = [
    "CountingFunc",
    "decay_sine",
    "decay_sine_exact",
    "LINEAR_MATRIX",
    "linear",
    "linear_exact",
    "kepler",
    "kepler_exact",
    "tanh_problem",
    "convergence_slope",
]


class CountingFunc(torch.nn.Module):
    """Wraps ``func(t, y)`` and counts its evaluations in ``calls``."""

    def __init__(self, func):
        super().__init__()
        self.func = func
        self.calls = 0

    def forward(self, t, y):
        self.calls += 1
        return self.func(t, y)


def decay_sine(t, y):
    """y' = -y + sin(t): linear, non-autonomous, any state shape."""
    return -y + torch.sin(t)


def decay_sine_exact(t, y0):
    """Exact solution of ``decay_sine`` from y(0) = y0 (floats or float64 arrays)."""
    t = np.asarray(t, dtype=np.float64)[..., None]
    y0 = np.asarray(y0, dtype=np.float64)
    return (y0 + 0.5) * np.exp(-t) + 0.5 * (np.sin(t) - np.cos(t))


# A damped rotation plus a decaying mode: complex eigenvalues -0.2 +- 1.5i and -0.7.
LINEAR_MATRIX = np.array([[-0.2, 1.5, 0.0], [-1.5, -0.2, 0.3], [0.0, 0.0, -0.7]])


def linear(t, y):
    """y' = A y for ``LINEAR_MATRIX`` A and a (..., 3) state."""
    return y @ torch.as_tensor(LINEAR_MATRIX, dtype=y.dtype).T


def linear_exact(t, y0):
    """expm(A t) y0 for a (3,) y0, at each time of the 1-D array ``t``: shape (len(t), 3)."""
    return np.stack([scipy.linalg.expm(LINEAR_MATRIX * time) @ np.asarray(y0) for time in np.atleast_1d(t)])


KEPLER_ECCENTRICITY = 0.5


def kepler(t, y):
    """Two-body problem q'' = -q / |q|^3 on the state (q1, q2, p1, p2): nonlinear."""
    q, p = y[..., :2], y[..., 2:]
    radius_cubed = (q * q).sum(-1, keepdim=True) ** 1.5
    return torch.cat([p, -q / radius_cubed], -1)


def kepler_exact(t):
    """Exact Kepler orbit of eccentricity 0.5 starting at the pericentre at t = 0 (period 2 pi).

    Solves Kepler's equation E - e sin E = t by Newton's method; returns (..., 4) float64.
    """
    e = KEPLER_ECCENTRICITY
    t = np.asarray(t, dtype=np.float64)
    anomaly = t.copy()
    for _ in range(50):
        anomaly = anomaly - (anomaly - e * np.sin(anomaly) - t) / (1 - e * np.cos(anomaly))
    denominator = 1 - e * np.cos(anomaly)
    root = math.sqrt(1 - e * e)
    return np.stack([np.cos(anomaly) - e, root * np.sin(anomaly), -np.sin(anomaly) / denominator,
                     root * np.cos(anomaly) / denominator], -1)


def tanh_problem(dtype, batch=3, dim=4, seed=0):
    """A small nonlinear, non-autonomous system y' = tanh(y W) + sin(t) on a (batch, dim) state.

    Returns ``(func, y0)``.
    """
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(dim, dim, generator=generator, dtype=dtype) * 0.5
    y0 = torch.randn(batch, dim, generator=generator, dtype=dtype)
    return (lambda t, y: torch.tanh(y @ weight) + torch.sin(t)), y0


def convergence_slope(step_sizes, errors):
    """Least-squares slope of log(error) against log(step size): the observed order."""
    return float(np.polyfit(np.log(step_sizes), np.log(errors), 1)[0])
