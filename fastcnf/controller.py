"""Adaptive step-size controller: scaled error ratio, accept/reject and the next step size.

This is the pure-Python reference. ``csrc/controller.cpp`` is its C++ twin, function for
function (``scaled_error_ratio``, ``propose_step`` and the ``StepController`` class), and the
solver uses the twin whenever the extension is built and the state is a contiguous float32 or
float64 CPU tensor. The arithmetic follows torchdiffeq's integral controller so that both
packages accept the same steps:

    factor = min(ifactor, max(safety / ratio ** (1 / order), dfactor))   (dfactor = 1 if ratio < 1)

A non-finite error ratio (NaN/Inf in the trial state or error estimate) rejects the step and
shrinks it by ``dfactor``; the caller turns repeated shrinking into a clear error.
"""

import math

import torch

__all__ = ["STATUS_OK", "STATUS_NONFINITE", "scaled_error_ratio", "propose_step", "StepController"]

STATUS_OK = 0
STATUS_NONFINITE = 1


def scaled_error_ratio(y0, y1, stages, error_weights, dt, rtol, atol, norm):
    """Norm of the local error estimate scaled by the tolerance.

    Args:
        y0, y1: (N,) state at the start and end of the trial step.
        stages: (S, N) stage derivatives k_j.
        error_weights: (S,) tensor ``b - b_embedded`` in the state dtype.
        dt: step size (float).
        rtol, atol: floats, or (N,) tensors of per-element tolerances.
        norm: a ``SegmentNorm`` or any callable mapping an (N,) tensor to a scalar.

    Returns:
        The error ratio as a Python float (may be NaN or Inf). A non-finite entry of ``y1`` makes
        its scaled error NaN (an infinite tolerance would otherwise hide it), as in the C++ twin.
    """
    with torch.no_grad():  # a step-size decision, never differentiated
        error = torch.mv(stages.t(), error_weights) * dt
        tolerance = atol + rtol * torch.maximum(y0.abs(), y1.abs())
        scaled = torch.where(torch.isfinite(y1), error / tolerance, math.nan)
        return float(norm(scaled))


def propose_step(error_ratio, dt, order, safety, ifactor, dfactor, min_step, max_step):
    """Decide on a trial step of size ``dt`` (all floats).

    Returns:
        ``(accept, dt_next, status)``; ``status`` is ``STATUS_NONFINITE`` when the ratio is
        NaN or Inf (then the step is rejected unless ``dt <= min_step``).
    """
    if not math.isfinite(error_ratio):
        return dt <= min_step, _clamp(dt * dfactor, min_step, max_step), STATUS_NONFINITE
    accept = error_ratio <= 1
    if dt > max_step:
        accept = False
    if dt <= min_step:
        accept = True
    if error_ratio == 0:
        dt_next = dt * ifactor
    else:
        shrink = 1.0 if error_ratio < 1 else dfactor
        dt_next = dt * min(ifactor, max(safety / error_ratio ** (1.0 / order), shrink))
    return accept, _clamp(dt_next, min_step, max_step), STATUS_OK


def _clamp(value, low, high):
    return min(max(value, low), high)


class StepController:
    """Everything about one solve's step control that stays fixed between steps.

    ``step(y0, y1, stages, dt)`` returns ``(accept, dt_next, error_ratio, status)``.
    """

    def __init__(self, error_weights, rtol, atol, norm, order, safety, ifactor, dfactor, min_step, max_step):
        self.error_weights = error_weights
        self.rtol, self.atol, self.norm = rtol, atol, norm
        self.order, self.safety, self.ifactor, self.dfactor = order, safety, ifactor, dfactor
        self.min_step, self.max_step = min_step, max_step

    def error_ratio(self, y0, y1, stages, dt):
        return scaled_error_ratio(y0, y1, stages, self.error_weights, dt, self.rtol, self.atol, self.norm)

    def step(self, y0, y1, stages, dt):
        ratio = self.error_ratio(y0, y1, stages, dt)
        accept, dt_next, status = propose_step(
            ratio, dt, self.order, self.safety, self.ifactor, self.dfactor, self.min_step, self.max_step
        )
        return accept, dt_next, ratio, status
