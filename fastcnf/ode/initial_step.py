"""Initial step size of an adaptive solve (Hairer, Norsett & Wanner, Solving ODEs I, II.4).

Same rule and constants as torchdiffeq so that both packages start with the same step.
"""

import torch

from .norms import widened

__all__ = ["initial_step_size"]


def initial_step_size(dynamics, t0, y0, f0, order, rtol, atol, norm, time_arg=None):
    """Guess a first step from two evaluations (f0 is given, one more is made).

    Args:
        dynamics: ``Dynamics`` (flat state).
        t0: start time (float).
        y0, f0: (N,) state and derivative at t0.
        order: order of the method's error estimate (the tableau's order minus one).
        rtol, atol: floats or (N,) tensors.
        norm: callable mapping an (N,) tensor to a scalar.
        time_arg: maps a float time to what ``dynamics`` receives (float or anchored tensor).

    Returns:
        The step size as a float. Half-precision states are measured in float32 (``widened``).
    """
    with torch.no_grad():
        scale = atol + widened(y0).abs() * rtol
        d0 = float(norm(widened(y0) / scale))
        d1 = float(norm(widened(f0) / scale))
        h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
        h0 = abs(h0)
        y1 = y0 + h0 * f0
    t1 = t0 + h0
    f1 = dynamics(time_arg(t1) if time_arg else t1, y1)
    with torch.no_grad():
        d2 = abs(float(norm(widened(f1 - f0) / scale)) / h0)
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / float(order + 1))
    return min(100 * h0, abs(h1))
