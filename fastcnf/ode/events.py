"""Event handling shared by every solver: the step budget, the sign watch, the bisection, and
gradients through the event time.

A solver steps from t0 and hands each new state to ``EventSearch.crossed``; when the combined event
value has changed sign, ``EventSearch.locate`` bisects the last step on the solver's interpolant.
Both the adaptive and the fixed-grid solvers use this one search, with one budget (``max_num_steps``,
or ``MAX_EVENT_STEPS`` when none is given, so an event that never happens cannot hang) and one error.

Gradients: the event time t* solves g(t*, y(t*)) = 0. By the implicit function theorem a change of
the final state moves t* by dt* = -(dg/dy . dy) / (dg/dt + dg/dy . f), so a loss on t* and y(t*)
sends its gradient into the final state only; odeint then carries it back to y0 and the parameters
(``EventTimeGradient``; the same rule as torchdiffeq's ``ImplicitFnGradientRerouting``).
"""

import math

import torch

from ..errors import MaxNumStepsError, NonFiniteStateError

__all__ = ["MAX_EVENT_STEPS", "EventSearch", "EventTimeGradient", "event_tolerance", "time_limit", "step_overflow"]

# Steps an event search takes at most when ``max_num_steps`` is not given (torchdiffeq's fixed-grid bound).
MAX_EVENT_STEPS = 20000


class EventSearch:
    """Watches ``event_fn(t, y)`` (t a float64 0-dim tensor, y the flat state) for a sign change.

    Args:
        event_fn: the combined event function (``fastcnf.ode.problem.EventFunction``).
        max_num_steps: the step budget (default ``MAX_EVENT_STEPS``).
        user_time: maps internal time to the user's (for messages).
    """

    def __init__(self, event_fn, max_num_steps=None, user_time=None):
        self.event_fn = event_fn
        self.budget_given = max_num_steps is not None
        self.budget = MAX_EVENT_STEPS if max_num_steps is None else int(max_num_steps)
        self.user_time = user_time or (lambda t: t)
        self.sign0 = None
        self.steps = 0

    def value(self, t, y):
        """The event value at (t, y), which must be finite."""
        value = self.event_fn(torch.tensor(t, dtype=torch.float64, device=y.device), y)
        if not bool(torch.isfinite(value).all()):
            raise NonFiniteStateError(f"the event function is NaN/Inf at t={self.user_time(t)!r} (the state or the "
                                      "dynamics stopped being finite).")
        return value

    def start(self, t, y):
        """Record the sign at the start; returns True when the event value is already zero there."""
        value = self.value(t, y)
        self.sign0 = torch.sign(value)
        return bool(value == 0)

    def count_step(self, t):
        """Count one more step from ``t``; raises when the budget is spent."""
        if self.steps >= self.budget:
            where = f"no event up to t={self.user_time(t)!r}; the event function kept its sign."
            if self.budget_given:  # torchdiffeq's words for each bound
                raise MaxNumStepsError(f"max_num_steps exceeded ({self.steps}>={self.budget}): {where}")
            raise MaxNumStepsError(f"Reached maximum number of iterations {self.budget}: {where} Pass "
                                   "options['max_num_steps'] to search longer.")
        self.steps += 1

    def crossed(self, t, y):
        """True when the event value at (t, y) no longer has the starting sign."""
        return bool(torch.sign(self.value(t, y)) != self.sign0)

    def locate(self, lo, hi, state_at, tol):
        """Event time (float) inside [lo, hi] by bisection to within ``tol`` on ``state_at(t) -> y``
        (torchdiffeq's number of halvings, fewer once the ends are adjacent floats)."""
        iterations = max(0, math.ceil(math.log2(hi - lo) - math.log2(tol))) if tol > 0 else 64
        with torch.no_grad():
            for _ in range(iterations):
                mid = (lo + hi) / 2.0
                if not lo < mid < hi:
                    break
                value = self.event_fn(torch.tensor(mid, dtype=torch.float64), state_at(mid))
                if torch.sign(value) == self.sign0:
                    lo = mid
                else:
                    hi = mid
        return (lo + hi) / 2.0


class EventTimeGradient(torch.autograd.Function):
    """Identity on (event_t, state) whose backward reroutes the event-time gradient (module docstring)."""

    @staticmethod
    def forward(ctx, dynamics, event_fn, event_t, state):
        ctx.dynamics, ctx.event_fn = dynamics, event_fn
        ctx.save_for_backward(event_t, state)
        return event_t.detach(), state.detach()

    @staticmethod
    def backward(ctx, grad_t, grad_state):
        event_t, state = ctx.saved_tensors
        event_t = event_t.detach().clone().requires_grad_(True)
        state = state.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            f_value = ctx.dynamics(event_t, state)
            value = ctx.event_fn(event_t, state)
            dg_dt, dg_dy = torch.autograd.grad(value, (event_t, state), allow_unused=True)
        dg_dt = torch.zeros_like(event_t) if dg_dt is None else dg_dt
        dg_dy = torch.zeros_like(state) if dg_dy is None else dg_dy
        f_value = f_value.detach()
        total_dg_dt = dg_dt + torch.sum(dg_dy * f_value)
        grad_t = grad_t + torch.sum(grad_state * f_value)
        grad_state = grad_state + dg_dy * (-grad_t / (total_dg_dt + 1e-12)).reshape_as(value)
        return None, None, None, grad_state


def time_limit(dtype):
    """The largest time (and step size) a solve may reach with a state of real dtype ``dtype``.

    What ``func`` receives must fit in ``dtype``, and so must a step size times a tableau weight
    (at most 17, dopri8's): the limit is ``finfo(dtype).max / 64``.
    """
    return float(torch.finfo(dtype).max) / 64


def step_overflow(user_t, dt, dtype):
    """The error for a step from ``user_t`` whose end leaves the times ``dtype`` holds (``time_limit``).

    It happens where nothing limits the step size: an event that never comes on dynamics whose
    error estimate is zero (the step grows tenfold per step) or a huge fixed ``step_size``.
    """
    return NonFiniteStateError(
        f"step size overflow: the step dt={dt!r} from t={user_t!r} goes beyond the times a {dtype} state can "
        f"be solved at (|t|, dt <= {time_limit(dtype):.4g}); no event was found up to there (the step size grows "
        "without bound where the error estimate is zero).")


def event_tolerance(atol):
    """The bisection tolerance: atol, or its smallest entry for per-element tolerances."""
    return float(atol) if not isinstance(atol, torch.Tensor) else float(atol.min())
