"""``odeint``, ``odeint_event`` and ``odeint_dense`` with torchdiffeq's signatures and semantics."""

import torch

from ..errors import InvalidOptionError
from .events import EventTimeGradient
from .interpolation import quartic_eval
from .problem import prepare
from .registry import METHODS

__all__ = ["odeint", "odeint_event", "odeint_dense"]


def odeint(func, y0, t, *, rtol=1e-7, atol=1e-9, method=None, options=None, event_fn=None):
    """Integrate dy/dt = func(t, y), y(t[0]) = y0, and return y at every time of ``t``.

    Args:
        func: ``func(t, y)`` returning dy/dt; ``t`` is a 0-dim tensor, ``y`` a tensor of any
            shape or a tuple of tensors (returning the same structure).
        y0: initial state (tensor or tuple of tensors).
        t: 1-D tensor of output times, strictly increasing or decreasing; t[0] is the start.
        rtol, atol: relative and absolute tolerances (floats, tensors, or tuples for tuple states).
        method: solver name (default ``"dopri5"``); see ``fastcnf.METHODS``.
        options: method options (``step_size``, ``first_step``, ``max_num_steps``, ...).
        event_fn: optional ``event_fn(t, y)``; the solve stops where it changes sign. Then
            ``t`` must have two entries (only ``t[0]`` is used) and the return is
            ``(event_t, solution)``.

    Returns:
        Tensor (or tuple) of shape (len(t), *y0.shape); with ``event_fn``, ``(event_t, solution)``.
    """
    problem = prepare(func, y0, t, rtol, atol, method, options, event_fn)
    solver = problem.build_solver()
    if event_fn is None:
        return problem.unflatten_solution(solver.integrate(problem.t))
    event_t, solution = solver.integrate_until_event(problem.t[0], problem.event_fn)
    event_t = event_t.to(problem.t)
    if problem.reverse:
        event_t = -event_t
    return event_t, problem.unflatten_solution(problem.event_solution_dtype(solution))


def odeint_event(func, y0, t0, *, event_fn, reverse_time=False, odeint_interface=odeint, **kwargs):
    """Solve from ``t0`` until ``event_fn(t, y) == 0``; returns ``(event_t, solution)``.

    Gradients flow to the event time through the implicit function theorem, as in torchdiffeq.
    ``odeint_interface`` may be ``odeint`` or ``odeint_adjoint``.
    """
    t0 = t0.reshape(-1)
    t = torch.cat([t0, t0.detach() - 1.0 if reverse_time else t0.detach() + 1.0])
    event_t, solution = odeint_interface(func, y0, t, event_fn=event_fn, **kwargs)

    problem = prepare(func, y0, t, 0.0, 0.0, None, None, event_fn)
    final_state = problem.layout.flatten(tuple(s[-1] for s in solution) if problem.layout.is_tuple else solution[-1])
    if reverse_time:
        event_t = -event_t
    event_t, final_state = EventTimeGradient.apply(problem.dynamics, problem.event_fn, event_t, final_state)
    if reverse_time:
        event_t = -event_t

    final_state = problem.layout.unflatten(final_state)
    if problem.layout.is_tuple:
        solution = tuple(torch.cat([s[:-1], s_t[None]], dim=0) for s, s_t in zip(solution, final_state))
    else:
        solution = torch.cat([solution[:-1], final_state[None]], dim=0)
    return event_t, solution


def odeint_dense(func, y0, t0, t1, *, rtol=1e-7, atol=1e-9, method=None, options=None):
    """Solve from ``t0`` to ``t1`` once and return a function giving y at any time in between.

    The returned ``dense(t)`` takes a 0-dim or 1-D tensor of times in [min(t0, t1), max(t0, t1)]
    and evaluates the adaptive method's interpolant (no further function evaluations).
    Works for every adaptive Runge-Kutta method (torchdiffeq: dopri5 only).
    """
    t0, t1 = torch.as_tensor(t0), torch.as_tensor(t1)
    t = torch.stack([t0, t1.to(t0)]).to(torch.float64 if not t0.is_floating_point() else t0.dtype)
    problem = prepare(func, y0, t, rtol, atol, method, options, None)
    if not METHODS[problem.method].adaptive:
        raise InvalidOptionError(f"odeint_dense needs an adaptive Runge-Kutta method, got {problem.method!r}.")
    solver = problem.build_solver()
    start, end = problem.t.tolist()
    steps = solver.dense_steps(start, end)
    return DenseSolution(steps, solver, problem)


class DenseSolution:
    """Piecewise quartic interpolant of an adaptive solve (returned by ``odeint_dense``)."""

    def __init__(self, steps, solver, problem):
        self.steps = steps
        self.solver = solver
        self.problem = problem
        self.ends = torch.tensor([step[1] for step in steps], dtype=torch.float64)
        self.start = problem.t[0].item()

    def __call__(self, t_eval):
        t_eval = torch.as_tensor(t_eval, dtype=torch.float64)
        flat_times = t_eval.reshape(-1).tolist()
        values = [self._at(-time if self.problem.reverse else time) for time in flat_times]
        out = torch.stack(values).reshape(*t_eval.shape, -1)
        return self.problem.layout.unflatten(out)

    def _at(self, time):
        lo, hi = min(self.start, self.ends[-1].item()), self.ends[-1].item()
        if not lo <= time <= hi:
            sign = -1 if self.problem.reverse else 1
            raise ValueError(f"t={sign * time} is outside the solved interval.")
        if time == self.start:
            return self.problem.y0
        index = min(int(torch.searchsorted(self.ends, torch.tensor(time, dtype=torch.float64))), len(self.steps) - 1)
        t0, t1, y0, y1, stages = self.steps[index]
        x = (time - t0) / (t1 - t0)
        return quartic_eval(x, y0, y1, stages, t1 - t0, self.solver.tableau.b_mid)
