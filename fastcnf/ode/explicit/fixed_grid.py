"""Fixed-grid solvers: explicit Runge-Kutta on a time grid (euler, midpoint, heun2, heun3, rk4).

The grid is ``t`` itself, a uniform grid of ``step_size`` ending exactly at ``t[-1]``, or what
the user's ``grid_constructor(func, y0, t)`` returns. Output times between grid points are
filled by linear or cubic Hermite interpolation (``interp``), as in torchdiffeq. When ``t``
requires gradients the grid (and so every step size) stays differentiable.

Subclasses (explicit, Adams, implicit Runge-Kutta) provide ``_increment``, the change of the state
over one step; ``_step`` adds it to the state (torchdiffeq's order: the increment is formed first).
The event search adds the increments with compensated (Kahan) summation in float32 and narrower
dtypes, so the state does not drift by a rounding per step against the float64 time and event
times are located to the dtype's resolution.
"""

import torch

from ...errors import InvalidOptionError, InvalidTimeGridError, NonFiniteStateError
from ...stats import record_solve
from ..events import EventSearch, event_tolerance, step_overflow, time_limit
from ..interpolation import cubic_hermite_interp, linear_interp
from .stepper import ExplicitRKStepper

__all__ = ["FixedGridSolver", "FixedGridRungeKutta", "CompensatedSum", "uniform_grid"]


def uniform_grid(step_size):
    """torchdiffeq's grid: t[0] + k * step_size, with the last point moved onto t[-1]."""

    def construct(func, y0, t):
        start, end = t[0], t[-1]
        count = torch.ceil((end - start) / step_size + 1).item()
        grid = torch.arange(0, count, dtype=t.dtype, device=t.device) * step_size + start
        grid[-1] = t[-1]
        return grid

    return construct


class FixedGridSolver:
    """Shared loop of the fixed-grid methods; ``_increment(t0, dt, t1, y0)`` returns ``(y1 - y0, f0)``."""

    OPTIONS = frozenset({"step_size", "grid_constructor", "interp", "perturb", "norm"})
    CALLBACKS = frozenset({"callback_step"})

    def __init__(self, dynamics, y0, rtol, atol, *, step_size=None, grid_constructor=None, interp="linear",
                 perturb=False, norm=None):
        self.dynamics = dynamics
        self.y0 = y0
        self.rtol, self.atol = rtol, atol
        self.step_size = step_size
        if interp not in ("linear", "cubic"):
            raise InvalidOptionError(f"Unknown interpolation method {interp!r}: interp must be 'linear' or 'cubic'.")
        self.interp = interp
        self.perturb = bool(perturb)
        if step_size is not None and grid_constructor is not None:
            raise ValueError("step_size and grid_constructor are mutually exclusive arguments.")
        if step_size is not None:
            self.grid_constructor = uniform_grid(step_size)
        elif grid_constructor is not None:
            self.grid_constructor = grid_constructor
        else:
            self.grid_constructor = lambda func, y0, t: t
        self.steps = 0

    def _start(self):
        """Called once before the first step of a solve."""

    def _increment(self, t0, dt, t1, y0):
        """``(dy, f0)``: the state's change over the step [t0, t1] and f at its start (subclasses)."""
        raise NotImplementedError

    def _step(self, t0, dt, t1, y0):
        """``(y1, f0)`` of one step."""
        dy, f0 = self._increment(t0, dt, t1, y0)
        return y0 + dy, f0

    def integrate(self, t):
        grid = self.grid_constructor(self.dynamics, self.y0, t)
        if not (grid[0] == t[0] and grid[-1] == t[-1]):
            raise InvalidTimeGridError(
                f"the time grid must start at t[0]={t[0].item()} and end at t[-1]={t[-1].item()}; "
                f"grid_constructor returned [{grid[0].item()}, ..., {grid[-1].item()}].")
        time_grad = grid.requires_grad and torch.is_grad_enabled()
        grid_points = list(grid.unbind()) if time_grad else _merge_repeats(grid.tolist())
        t_points = list(t.unbind()) if time_grad else t.tolist()
        self._start()
        outputs, j, y0 = [self.y0], 1, self.y0
        try:
            for t0, t1 in zip(grid_points[:-1], grid_points[1:]):
                dt = t1 - t0
                self.dynamics.callback("callback_step", _as_float(t0), y0, _as_float(dt))
                y1, f0 = self._step(t0, dt, t1, y0)
                self.steps += 1
                while j < len(t_points) and t1 >= t_points[j]:
                    outputs.append(self._interpolate(t0, t1, y0, y1, f0, t_points[j]))
                    _check_finite(outputs[-1], t0, t1, self.dynamics.reverse)
                    j += 1
                y0 = y1
        finally:
            self._report()
        return torch.stack(outputs)

    def integrate_until_event(self, t0, event_fn):
        if self.step_size is None:
            raise InvalidOptionError("Event handling for fixed step solvers currently requires `step_size` to be "
                                     "provided in options.")
        time = _anchored_time(t0)
        t0 = torch.as_tensor(t0).item()
        dt = float(self.step_size)
        y0 = self.y0
        search = EventSearch(event_fn, user_time=self._user_t)
        summation = CompensatedSum(y0)
        self._start()
        try:
            search.start(t0, y0)
            while True:
                search.count_step(t0)
                t1 = t0 + dt
                if max(abs(t1), dt) > time_limit(self.dynamics.real_dtype):
                    raise step_overflow(self._user_t(t0), dt, self.dynamics.real_dtype)
                dy, f0 = self._increment(time(t0), dt, time(t1), y0)
                y1 = summation.add(y0, dy)
                self.steps += 1
                if search.crossed(t1, y1):
                    event_t, y_event = self._locate_event(search, t0, t1, y0, y1, f0, time)
                    return event_t, torch.stack([self.y0, y_event])
                t0, y0 = t1, y1
        finally:
            self._report()

    def _user_t(self, t):
        return -t if self.dynamics.reverse else t

    def _locate_event(self, search, t0, t1, y0, y1, f0, time):
        """Bisection on floats; the returned state is interpolated between ``time(t0)`` and ``time(t1)``."""
        f1 = self.dynamics(time(t1), y1) if self.interp == "cubic" else None

        def state_at(t, start=t0, end=t1):
            if f1 is None:
                return linear_interp(start, end, y0, y1, t)
            return cubic_hermite_interp(start, y0, f0, end, y1, f1, t)

        event_t = search.locate(t0, t1, state_at, event_tolerance(self.atol))
        return torch.tensor(event_t, dtype=torch.float64), state_at(event_t, time(t0), time(t1))

    def _interpolate(self, t0, t1, y0, y1, f0, t):
        if self.interp == "linear":
            return linear_interp(t0, t1, y0, y1, t)
        f1 = self.dynamics(t1, y1)
        return cubic_hermite_interp(t0, y0, f0, t1, y1, f1, t)

    def _report(self):
        record_solve(self.dynamics, self.steps)
        self.steps = 0


class FixedGridRungeKutta(FixedGridSolver):
    """Explicit Runge-Kutta on a grid for one tableau of ``fastcnf.ode.explicit.tableaus.FIXED_TABLEAUS``."""

    def __init__(self, dynamics, y0, rtol, atol, *, tableau, **options):
        super().__init__(dynamics, y0, rtol, atol, **options)
        self.stepper = ExplicitRKStepper(tableau, dynamics, y0.numel(), y0.dtype, y0.device,
                                         perturb_start=self.perturb, perturb_end=self.perturb)
        self._buffer = 0

    def _start(self):
        if not torch.is_grad_enabled():
            self.stepper.reuse_buffers()

    def _step(self, t0, dt, t1, y0):
        """The fused path: the stepper combines y1 directly (no separate increment tensor)."""
        f0 = self.stepper.first_stage(t0, y0)
        self._buffer = 1 - self._buffer
        y1, _, _ = self.stepper.step(t0, y0, f0, dt, t1, buffer=self._buffer, keep_stages=False)
        return y1, f0

    def _increment(self, t0, dt, t1, y0):
        f0 = self.stepper.first_stage(t0, y0)
        self._buffer = 1 - self._buffer
        _, stages, _ = self.stepper.step(t0, y0, f0, dt, t1, buffer=self._buffer)
        return self.stepper.increment(stages, dt), f0


class CompensatedSum:
    """Kahan summation of a state's increments: ``add(y, dy)`` returns y + dy and keeps what that
    rounding lost, to add it back with the next increment. A no-op (plain ``y + dy``) for float64."""

    def __init__(self, y0):
        self.lost = None if y0.dtype == torch.float64 else torch.zeros_like(y0)

    def add(self, y, dy):
        if self.lost is None:
            return y + dy
        dy = dy + self.lost
        y_new = y + dy
        self.lost = dy - (y_new - y)
        return y_new


def _as_float(value):
    """A float or a 0-dim tensor (possibly requiring grad) as a float."""
    return value.item() if isinstance(value, torch.Tensor) else value


def _anchored_time(t0):
    """Float time -> what the solver passes on: the float, or a float64 tensor tied to ``t0`` when
    ``t0`` requires grad, so that the state at an event depends on the start time."""
    t0 = torch.as_tensor(t0)
    if not (t0.requires_grad and torch.is_grad_enabled()):
        return lambda t: t
    anchor, anchor_value = t0.to(torch.float64), t0.item()
    return lambda t: anchor + (t - anchor_value)


def _merge_repeats(points):
    """Drop zero-length steps (repeated grid points); they change nothing but cost evaluations."""
    merged = points[:1]
    for point in points[1:]:
        if point != merged[-1]:
            merged.append(point)
    return merged


def _check_finite(value, t0, t1, reverse):
    """Raise if an output is not finite (checked per output, not per step, to avoid a sync per step)."""
    if not bool(torch.isfinite(value).all()):
        sign = -1 if reverse else 1
        raise NonFiniteStateError(f"non-finite values in state `y`: NaN/Inf at the output in the step from "
                                  f"t={sign * _as_float(t0)} to "
                                  f"t={sign * _as_float(t1)} (it may have appeared in an earlier step).")
