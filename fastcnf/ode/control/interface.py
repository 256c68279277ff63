"""The step-size controller seam: one status vocabulary, one rule's settings, one interface.

Every adaptive loop (the host loop of ``fastcnf.ode.explicit.adaptive`` and the device loop of
``fastcnf.ode.explicit.device_loop``) asks a ``StepSizeController`` for the first step
(``initial_step``) and, after every trial step, for a ``Decision`` (``adapt``): accept or reject,
the next step size, the scaled error ratio, a ``Status`` and the error ratio of the last accepted
step. That last one is the controller's only state: the loop holds it (1.0 before the first step)
and hands it back to the next ``adapt``, so the controllers themselves stay stateless. The Python
reference, the C++ twin and the Triton twin implement the same rule (``StepRule``);
``fastcnf.ode.control.make_controller`` chooses one. The C++ header and the Triton kernels use the
same status values.
"""

from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

import torch

from ...errors import InvalidOptionError, MaxNumStepsError, NonFiniteStateError, StepSizeUnderflowError
from ..initial_step import initial_step_size

__all__ = ["Status", "StepRule", "Decision", "StepSizeController", "solve_failure", "CONTROLLERS", "PI_COEFFICIENTS",
           "pi_settings"]

CONTROLLERS = ("integral", "pi")
PI_COEFFICIENTS = dict(pcoeff=0.4, icoeff=0.3)  # Hairer-Wanner II, IV.2: alpha = 0.7 / k, beta = 0.4 / k


class Status(IntEnum):
    """What a controller or a loop says about a trial step or a solve (values shared with C++ and Triton)."""

    OK = 0                # the trial step was judged; the solve goes on
    NONFINITE = 1         # NaN/Inf in the trial step: rejected, dt shrunk by dfactor
    FAILED_NONFINITE = 2  # NaN/Inf with dt already at min_step: the solve fails
    FAILED_UNDERFLOW = 3  # dt no longer advances t (set by the loops)
    FAILED_MAX_STEPS = 4  # max_num_steps reached before the next output time (set by the loops)


@dataclass(frozen=True)
class StepRule:
    """The step-size rule: after a trial step with error ratio r,

        integral (torchdiffeq's, the default):
            factor = min(ifactor, max(safety / r ** (1 / order), dfactor if r >= 1 else 1))
        pi (Gustafsson/Soderlind; Hairer-Wanner II, IV.2; diffrax's and torchode's PID controllers):
            factor = min(ifactor, max(safety * r ** (-(icoeff + pcoeff) / order)
                                             * r_last ** (pcoeff / order), dfactor if r >= 1 else 1))

    with r_last the error ratio of the last accepted step (1 before the first and after a step
    accepted with r = 0). ``dt_next = clamp(dt * factor, min_step, max_step)``; r == 0
    grows dt by ``ifactor``; a step is accepted when r <= 1 (always at ``min_step``, never above
    ``max_step``). ``order`` is the tableau's order (torchdiffeq's exponent). With pcoeff = 0 and
    icoeff = 1 the PI rule is the integral rule; the PI defaults (``PI_COEFFICIENTS``) are
    Hairer-Wanner's alpha = 0.7 / order, beta = 0.4 / order.
    """

    order: float
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2
    min_step: float = 0.0
    max_step: float = float("inf")
    controller: str = "integral"
    pcoeff: float = PI_COEFFICIENTS["pcoeff"]
    icoeff: float = PI_COEFFICIENTS["icoeff"]

    def __post_init__(self):
        if self.controller not in CONTROLLERS:
            raise ValueError(f"controller must be one of {CONTROLLERS}, got {self.controller!r}.")

    @property
    def pi(self):
        return self.controller == "pi"


def pi_settings(controller="integral", pcoeff=None, icoeff=None):
    """``StepRule`` keyword arguments from the solver options ``controller``, ``pcoeff`` and ``icoeff``
    (their values are checked by ``fastcnf.ode.validation``; here, that they go together)."""
    if controller != "pi" and (pcoeff is not None or icoeff is not None):
        raise InvalidOptionError("options 'pcoeff' and 'icoeff' tune the PI controller; pass controller='pi' as well.")
    settings = dict(controller=controller)
    for name, value in (("pcoeff", pcoeff), ("icoeff", icoeff)):
        if value is not None:
            settings[name] = float(value)
    return settings


class Decision(NamedTuple):
    """The verdict on one trial step: Python values from host controllers, 0-dim device tensors from
    device controllers (``on_device``). ``last_ratio`` is the error ratio of the last accepted step
    after this decision, for the next ``adapt``."""

    accept: object
    dt_next: object
    error_ratio: object
    status: object
    last_ratio: object

    def to_host(self):
        """The same decision as Python values (one device synchronization for device tensors)."""
        if not isinstance(self.accept, torch.Tensor):
            return self
        accept, dt_next, ratio, status, last_ratio = torch.stack(
            [self.accept.double(), self.dt_next.double(), self.error_ratio.double(), self.status.double(),
             self.last_ratio.double()]).tolist()
        return Decision(bool(accept), dt_next, ratio, Status(int(status)), last_ratio)


class StepSizeController:
    """Base of the controllers: the rule, the tolerances and the error norm of one solve.

    Args:
        rule: ``StepRule``.
        error_weights: (S,) floats ``b - b_embedded`` of the tableau.
        rtol, atol: floats or (N,) tensors.
        norm: ``SegmentNorm`` or a callable on an (N,) tensor.
    """

    on_device = False  # True when ``adapt`` returns device tensors and needs no host synchronization

    def __init__(self, rule, error_weights, rtol, atol, norm):
        self.rule, self.error_weights = rule, tuple(float(w) for w in error_weights)
        self.rtol, self.atol, self.norm = rtol, atol, norm

    def initial_step(self, dynamics, t0, y0, f0, time_arg=None):
        """First step size (float) from f0 and one more evaluation (Hairer-Norsett-Wanner II.4)."""
        return initial_step_size(dynamics, t0, y0, f0, self.rule.order - 1, self.rtol, self.atol, self.norm,
                                 time_arg)

    def adapt(self, y0, y1, stages, dt, last_ratio=1.0):
        """The decision on the trial step y0 -> y1 of size ``dt`` with (S, N) ``stages``; ``last_ratio`` is the
        error ratio of the last accepted step (the previous decision's ``last_ratio``). A ``Decision``, or (C++
        twin, to save a Python layer per step) a plain tuple in its order; callers unpack it."""
        raise NotImplementedError


def solve_failure(status, t, dt, max_num_steps=None, after_nonfinite=False):
    """The error to raise for a failed solve (``status`` one of the ``FAILED_*``) at user time ``t``.

    Each message opens with torchdiffeq's words for the same failure ("underflow in dt",
    "non-finite values in state `y`", "max_num_steps exceeded"), which client code matches on.
    """
    if status == Status.FAILED_UNDERFLOW:
        return StepSizeUnderflowError(
            f"underflow in dt {dt!r}: the step size no longer advances t={t!r}"
            + (" after NaN/Inf values appeared in the trial steps; the dynamics are not finite there."
               if after_nonfinite else "."))
    if status == Status.FAILED_NONFINITE:
        return NonFiniteStateError(f"non-finite values in state `y` or its derivative in the step from t={t!r} "
                                   f"(dt={dt!r} is already at min_step).")
    if status == Status.FAILED_MAX_STEPS:
        return MaxNumStepsError(f"max_num_steps exceeded ({max_num_steps}>={max_num_steps}) at t={t!r}: the solver "
                                "could not reach the next output time. Loosen rtol/atol or raise "
                                "options['max_num_steps'].")
    raise ValueError(f"{Status(status)!r} is not a failure.")
