"""Dense output inside one accepted step.

Adaptive Runge-Kutta steps use torchdiffeq's quartic interpolant through y0, y1, the midpoint
estimate ``y_mid = y0 + dt * sum_j b_mid[j] k_j`` and the end slopes ``k_0``, ``k_{S-1}``.
Written as weights on those quantities, at ``x = (t - t0) / dt`` in [0, 1]:

    y(x) = lerp(y0, y1, w(x)) + dt * (v(x) @ K)
    w(x) = -5 x^2 + 14 x^3 - 8 x^4
    v(x) = 16 x^2 (1-x)^2 b_mid + (x - 4x^2 + 5x^3 - 2x^4) e_0 + (x^2 - 3x^3 + 2x^4) e_{S-1}

so evaluating it is one ``lerp`` and one matrix-vector product, with no coefficient tensors.
Fixed-grid solvers use linear or cubic Hermite interpolation like torchdiffeq.
"""

import torch

__all__ = ["quartic_weights", "quartic_eval", "linear_interp", "cubic_hermite_interp"]


def quartic_weights(x, b_mid):
    """Weights ``(w, v)`` of the quartic interpolant at ``x`` (float or 0-dim tensor).

    ``w`` is the lerp weight of y1 against y0; ``v`` is a list of S stage weights.
    """
    x2 = x * x
    x3 = x2 * x
    x4 = x2 * x2
    w = -5 * x2 + 14 * x3 - 8 * x4
    mid = 16 * x2 * (1 - x) * (1 - x)
    v = [mid * weight for weight in b_mid]
    v[0] = v[0] + (x - 4 * x2 + 5 * x3 - 2 * x4)
    v[-1] = v[-1] + (x2 - 3 * x3 + 2 * x4)
    return w, v


def quartic_eval(x, y0, y1, stages, dt, b_mid):
    """Quartic dense output at ``x``; ``stages`` is (S, N), y0/y1 are (N,), dt a float or tensor."""
    w, v = quartic_weights(x, b_mid)
    if isinstance(x, torch.Tensor) or isinstance(dt, torch.Tensor):
        v = torch.stack([torch.as_tensor(vi, dtype=y0.dtype, device=y0.device) for vi in v])
        return y0 + w * (y1 - y0) + dt * torch.mv(stages.t(), v.to(y0.dtype))
    v = torch.tensor(v, dtype=y0.dtype, device=y0.device)
    return torch.addmv(torch.lerp(y0, y1, w), stages.t(), v, alpha=dt)


def linear_interp(t0, t1, y0, y1, t):
    if t == t0:
        return y0
    if t == t1:
        return y1
    return y0 + (t - t0) / (t1 - t0) * (y1 - y0)


def cubic_hermite_interp(t0, y0, f0, t1, y1, f1, t):
    h = (t - t0) / (t1 - t0)
    h00 = (1 + 2 * h) * (1 - h) * (1 - h)
    h10 = h * (1 - h) * (1 - h)
    h01 = h * h * (3 - 2 * h)
    h11 = h * h * (h - 1)
    dt = t1 - t0
    return h00 * y0 + h10 * dt * f0 + h01 * y1 + h11 * dt * f1
