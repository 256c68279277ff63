"""Noise of the stochastic divergence estimators, and the hook through which a training loop
decides how it is drawn.

``draw_noise(kind, like)`` draws Gaussian or Rademacher noise shaped like ``like`` from torch's
global generator. An estimator draws through ``estimator_noise``, which hands the draw to the
innermost active ``noise_source`` if there is one: ``source(draw, like)`` must return noise for
``like``'s rows, e.g. by drawing it for a whole global batch and keeping this process's rows
(``fastcnf.training.sharding.shard_draws``), so that a sample's noise does not depend on how many
processes share the batch.
"""

from contextlib import contextmanager
from functools import partial

import torch

__all__ = ["NOISES", "draw_noise", "estimator_noise", "noise_source"]

NOISES = ("gaussian", "rademacher")
_SOURCES = []


def draw_noise(kind, like):
    """Noise of ``like``'s shape, dtype and device from the global torch RNG (unit covariance)."""
    if kind == "gaussian":
        return torch.randn_like(like)
    if kind == "rademacher":
        return torch.randint_like(like, 0, 2).mul_(2).sub_(1)
    raise ValueError(f"unknown noise {kind!r}; choose one of {', '.join(NOISES)}.")


@contextmanager
def noise_source(source):
    """Inside the block estimators draw their noise through ``source(draw, like)``."""
    _SOURCES.append(source)
    try:
        yield
    finally:
        _SOURCES.pop()


def estimator_noise(kind, like):
    """Noise of ``kind`` for a state shaped like ``like``, through the active noise source if any."""
    draw = partial(draw_noise, kind)
    return _SOURCES[-1](draw, like) if _SOURCES else draw(like)
