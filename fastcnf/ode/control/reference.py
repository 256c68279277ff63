"""The Python reference controller: scaled error ratio, accept/reject and the next step size.

``csrc/controller.cpp`` is its C++ twin, function for function (``scaled_error_ratio``,
``propose_step``), and ``fastcnf.kernels.rk_stage`` its Triton twin; the tests hold both to this
one. The rule is ``StepRule``'s: torchdiffeq's integral controller by default, so both packages
accept the same steps, or the PI controller. A non-finite error ratio (NaN/Inf in the trial state or
error estimate) rejects the step and shrinks it by ``dfactor`` (``Status.NONFINITE``); at ``min_step``
the solve fails (``Status.FAILED_NONFINITE``).
"""

import math

import torch

from .interface import Decision, Status, StepSizeController

__all__ = ["scaled_error_ratio", "propose_step", "ReferenceController"]


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


def propose_step(error_ratio, dt, rule, last_ratio=1.0):
    """Decide on a trial step of size ``dt`` (floats) with ``rule`` (a ``StepRule``).

    ``last_ratio`` is the error ratio of the last accepted step (the PI rule reads it).

    Returns:
        ``(accept, dt_next, status, last_ratio)``, the last one for the next decision.
    """
    if not math.isfinite(error_ratio):
        status = Status.FAILED_NONFINITE if dt <= rule.min_step else Status.NONFINITE
        return False, _clamp(dt * rule.dfactor, rule.min_step, rule.max_step), status, last_ratio
    accept = error_ratio <= 1
    if dt > rule.max_step:
        accept = False
    if dt <= rule.min_step:
        accept = True
    if error_ratio == 0:
        dt_next = dt * rule.ifactor
    else:
        shrink = 1.0 if error_ratio < 1 else rule.dfactor
        if rule.pi:
            proposal = (rule.safety * error_ratio ** (-(rule.icoeff + rule.pcoeff) / rule.order)
                        * last_ratio ** (rule.pcoeff / rule.order))
        else:
            proposal = rule.safety / error_ratio ** (1.0 / rule.order)
        dt_next = dt * min(rule.ifactor, max(proposal, shrink))
    if accept:
        last_ratio = error_ratio if error_ratio > 0 else 1.0
    return accept, _clamp(dt_next, rule.min_step, rule.max_step), Status.OK, last_ratio


def _clamp(value, low, high):
    return min(max(value, low), high)


class ReferenceController(StepSizeController):
    """The pure-torch controller: any dtype, device, norm and tolerance (the reference backend)."""

    def __init__(self, rule, error_weights, rtol, atol, norm, dtype, device):
        super().__init__(rule, error_weights, rtol, atol, norm)
        self.weights = torch.tensor(self.error_weights, dtype=dtype, device=device)

    def adapt(self, y0, y1, stages, dt, last_ratio=1.0):
        ratio = scaled_error_ratio(y0, y1, stages, self.weights, dt, self.rtol, self.atol, self.norm)
        accept, dt_next, status, last_ratio = propose_step(ratio, dt, self.rule, last_ratio)
        return Decision(accept, dt_next, ratio, status, last_ratio)
