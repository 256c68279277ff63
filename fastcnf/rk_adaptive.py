"""Adaptive explicit Runge-Kutta solver (dopri5, tsit5, dopri8, bosh3, fehlberg2, adaptive_heun).

One stepper reads any tableau of ``fastcnf.tableaus``. Time is kept as Python floats (float64)
and the stages of a step live in one (S, N) buffer, so a stage costs a single ``addmv`` and the
error estimate, its scaled norm and the step-size decision are one call into the C++
controller. Outside autograd two stage buffers are reused for the whole solve.

Step acceptance, the step-size rule, ``step_t``/``jump_t`` handling, perturbed evaluations at
step ends and the quartic dense output follow torchdiffeq, so both packages take the same
steps and return the same values (to rounding).
"""

import math

import torch

from . import controller as py_controller
from .backend import ext, select_backend
from .dynamics import CALLBACK_NAMES, Perturb
from .device_loop import DEFAULT_CHECK_EVERY, integrate_on_device
from .errors import InvalidOptionError, MaxNumStepsError, NonFiniteStateError, StepSizeUnderflowError
from .initial_step import initial_step_size
from .interp import quartic_eval
from .rk_stepper import ExplicitRKStepper
from .norms import SegmentNorm
from .stats import record_solve

__all__ = ["AdaptiveRungeKutta", "MAX_NONFINITE_TRIALS", "MAX_EVENT_STEPS"]

# A solve gives up after this many trial steps with NaN/Inf in them. Shrinking the step recovers
# from a trial that overshoots into overflow within a few rejections; a solution that itself
# overflows would otherwise creep along at the float maximum, rejecting and accepting forever.
MAX_NONFINITE_TRIALS = 1000
# Default bound on the steps of an event search when max_num_steps is not given (the fixed-grid
# event search has the same bound, as in torchdiffeq): an event that never happens must not hang.
MAX_EVENT_STEPS = 20000


class _Step:
    """The last accepted step [t0, t1] and what the next step starts from."""

    __slots__ = ("t0", "t1", "y0", "y1", "stages", "f1", "dt_next", "buffer")

    def __init__(self, t0, t1, y0, y1, stages, f1, dt_next, buffer):
        self.t0, self.t1, self.y0, self.y1 = t0, t1, y0, y1
        self.stages, self.f1, self.dt_next, self.buffer = stages, f1, dt_next, buffer


class AdaptiveRungeKutta:
    """Adaptive solver for one tableau; see the module docstring.

    Args:
        dynamics: ``Dynamics`` of the problem (flat state).
        y0: (N,) initial state.
        rtol, atol: floats or (N,) tensors.
        tableau: an adaptive ``ButcherTableau``.
        norm: ``SegmentNorm`` (fast path) or any callable on an (N,) tensor.
        Other keyword arguments are torchdiffeq's options of the same names.
    """

    OPTIONS = frozenset({"norm", "first_step", "min_step", "max_step", "step_t", "jump_t", "safety", "ifactor",
                         "dfactor", "max_num_steps", "dtype", "device_loop", "check_every"})
    CALLBACKS = frozenset(CALLBACK_NAMES)

    def __init__(self, dynamics, y0, rtol, atol, *, tableau, norm, first_step=None, min_step=0.0,
                 max_step=math.inf, step_t=None, jump_t=None, safety=0.9, ifactor=10.0, dfactor=0.2,
                 max_num_steps=None, dtype=torch.float64, device_loop=None, check_every=DEFAULT_CHECK_EVERY):
        self.dynamics = dynamics
        self.y0 = y0
        self.rtol, self.atol = rtol, atol
        self.tableau = tableau
        self.norm = norm
        self.first_step = None if first_step is None else float(first_step)
        self.min_step, self.max_step = float(min_step), float(max_step)
        self.safety, self.ifactor, self.dfactor = float(safety), float(ifactor), float(dfactor)
        self.max_num_steps_given = max_num_steps is not None
        self.max_num_steps = 2 ** 31 - 1 if max_num_steps is None else int(max_num_steps)
        self.step_t = _sorted_floats(step_t)
        self.jump_t = _sorted_floats(jump_t)
        if set(self.step_t) & set(self.jump_t):
            raise ValueError("`step_t` and `jump_t` must not have any repeated elements between them.")

        self.device_loop = self._wants_device_loop(device_loop)
        self.check_every = int(check_every)
        self.stepper = ExplicitRKStepper(tableau, dynamics, y0.numel(), y0.dtype, y0.device)
        self.b_error = torch.tensor(tableau.b_error, dtype=y0.dtype, device=y0.device)
        self.controller = self._make_controller(select_backend(y0.device))
        self.time_anchor = None
        self.last_step_size = None  # the step size proposed after the last step of integrate()
        self.accepted = self.rejected = 0
        self._last_nonfinite = False
        self._nonfinite_trials = 0

    # ------------------------------------------------------------------ setup
    def _make_controller(self, backend):
        triton = (backend == "triton" and self.y0.dtype in (torch.float32, torch.float64)
                  and isinstance(self.norm, SegmentNorm))
        if triton:
            return _TritonController(self.tableau, self.norm, self.y0, self.rtol, self.atol,
                                     order=float(self.tableau.order), safety=self.safety, ifactor=self.ifactor,
                                     dfactor=self.dfactor, min_step=self.min_step, max_step=self.max_step)
        fused = (
            backend == "cpp"
            and self.y0.device.type == "cpu"
            and self.y0.dtype in (torch.float32, torch.float64)
            and isinstance(self.norm, SegmentNorm)
            and not isinstance(self.rtol, torch.Tensor)
            and not isinstance(self.atol, torch.Tensor)
        )
        args = dict(rtol=float(self.rtol) if fused else self.rtol, atol=float(self.atol) if fused else self.atol,
                    order=float(self.tableau.order), safety=self.safety, ifactor=self.ifactor,
                    dfactor=self.dfactor, min_step=self.min_step, max_step=self.max_step)
        if fused:
            return _FusedController(ext.StepController(
                error_weights=list(self.tableau.b_error), segment_ends=list(self.norm.ends),
                segment_skip=list(self.norm.skip), is_double=self.y0.dtype == torch.float64, **args))
        return py_controller.StepController(error_weights=self.b_error, norm=self.norm, **args)

    def _wants_device_loop(self, requested):
        """The sync-free loop: on CUDA by default; never with step_t/jump_t or step callbacks."""
        eligible = not self.step_t and not self.jump_t and not any(
            self.dynamics.has_callback(name) for name in CALLBACK_NAMES)
        if requested is None:
            return eligible and self.y0.device.type == "cuda"
        if requested and not eligible:
            raise InvalidOptionError("device_loop=True cannot be combined with step_t, jump_t or step callbacks.")
        return bool(requested)

    def _time(self, t):
        """What the dynamics receive for float time ``t``: the float, or a tensor tied to t[0]."""
        if self.time_anchor is None:
            return t
        anchor, anchor_value = self.time_anchor
        return anchor + (t - anchor_value)

    # ------------------------------------------------------------------ public
    def integrate(self, t):
        """Solution at every time of the increasing 1-D tensor ``t``: a (len(t), N) tensor."""
        if self.device_loop:
            try:
                return integrate_on_device(self, t, self.check_every)
            finally:
                self._report()
        times = t.tolist()
        time_grad = t.requires_grad and torch.is_grad_enabled()
        outputs = [self.y0]
        try:
            if len(times) > 1:
                step = self._start(times[0], t[0] if time_grad else None)
                for i in range(1, len(times)):
                    step = self._advance(step, times[i])
                    outputs.append(self._dense(step, t[i] if time_grad else times[i]))
                self.last_step_size = step.dt_next
        finally:
            self._report()
        return torch.stack(outputs)

    def integrate_until_event(self, t0, event_fn):
        """Step from ``t0`` until ``event_fn(t, y)`` changes sign; returns (event_t, (2, N) solution).

        ``event_fn`` takes a float64 0-dim time tensor and an (N,) state; the event time is
        located by bisection on the dense output to within ``atol``. When ``t0`` requires grad
        the state at the event depends on it (as in torchdiffeq), so chained events differentiate.
        """
        t0 = torch.as_tensor(t0)
        anchor = t0.to(torch.float64) if t0.requires_grad and torch.is_grad_enabled() else None
        try:
            step = self._start(t0.item(), anchor)
            value = event_fn(torch.tensor(step.t1, dtype=torch.float64, device=self.y0.device), step.y1)
            if value == 0:
                event_t, y_event = torch.tensor(step.t1, dtype=torch.float64), step.y1
            else:
                sign0 = torch.sign(value)
                budget = MAX_EVENT_STEPS
                attempts = 0
                while sign0 == torch.sign(event_fn(torch.tensor(step.t1, dtype=torch.float64), step.y1)):
                    previous = step
                    while step is previous:
                        if self.max_num_steps_given:
                            self._check_budget(attempts, step.t1)
                        elif attempts >= budget:
                            raise MaxNumStepsError(
                                f"no event after {attempts} steps (up to t={self._user_t(step.t1)!r}); the event "
                                "function kept its sign. Pass options['max_num_steps'] to search longer.")
                        step = self._adaptive_step(step)
                        attempts += 1
                event_t, y_event = self._locate_event(step, sign0, event_fn)
        finally:
            self._report()
        return event_t, torch.stack([self.y0, y_event])

    def dense_steps(self, t0, t1):
        """Solve on [t0, t1] (floats) and return every accepted step as (t0, t1, y0, y1, stages)."""
        steps = []
        try:
            step = self._start(t0, None)
            attempts = 0
            while t1 > step.t1:
                self._check_budget(attempts, step.t1)
                new_step = self._adaptive_step(step)
                attempts += 1
                if new_step is not step:
                    steps.append((new_step.t0, new_step.t1, new_step.y0, new_step.y1, new_step.stages.clone()))
                step = new_step
        finally:
            self._report()
        return steps

    # ------------------------------------------------------------------ stepping
    def _start(self, t0, anchor):
        if anchor is not None:
            self.time_anchor = (anchor, t0)
        if not torch.is_grad_enabled():
            self.stepper.reuse_buffers()
        f0 = self.dynamics(self._time(t0), self.y0)
        if self.first_step is None:
            dt = initial_step_size(self.dynamics, t0, self.y0, f0, self.tableau.order - 1, self.rtol, self.atol,
                                   self.norm, self._time if anchor is not None else None)
        else:
            dt = self.first_step
        self._next_step_t = _first_index_after(self.step_t, t0)
        self._next_jump_t = _first_index_after(self.jump_t, t0)
        return _Step(t0, t0, self.y0, self.y0, None, f0, dt, buffer=1)

    def _advance(self, step, t_out):
        attempts = 0
        while t_out > step.t1:
            self._check_budget(attempts, step.t1)
            step = self._adaptive_step(step)
            attempts += 1
        return step

    def _check_budget(self, attempts, t):
        if attempts >= self.max_num_steps:
            raise MaxNumStepsError(
                f"max_num_steps exceeded ({attempts}>={self.max_num_steps}) at t={self._user_t(t)}: the solver "
                f"could not reach the next output time. Loosen rtol/atol or raise options['max_num_steps'].")

    def _user_t(self, t):
        return -t if self.dynamics.reverse else t

    def _adaptive_step(self, step):
        """One trial step from ``step.t1``; returns a new _Step if accepted, else ``step`` with a smaller dt."""
        t0, y0, f0 = step.t1, step.y1, step.f1
        dt = step.dt_next
        if not math.isfinite(dt):
            dt = self.min_step
        dt = min(max(dt, self.min_step), self.max_step)
        self.dynamics.callback("callback_step", t0, y0, dt)
        t1 = t0 + dt
        if not t1 > t0:
            raise StepSizeUnderflowError(
                f"step size underflow: dt={dt!r} no longer advances t={self._user_t(t0)!r}"
                + (" after NaN/Inf values appeared in the trial steps; the dynamics are not finite there."
                   if self._last_nonfinite else "."))

        on_step_t = on_jump_t = False
        if self.step_t:
            next_step_t = self.step_t[self._next_step_t]
            on_step_t = t0 < next_step_t < t1
            if on_step_t:
                t1, dt = next_step_t, next_step_t - t0
        if self.jump_t:
            next_jump_t = self.jump_t[self._next_jump_t]
            on_jump_t = t0 < next_jump_t < t1
            if on_jump_t:
                on_step_t = False
                t1, dt = next_jump_t, next_jump_t - t0

        buffer = 1 - step.buffer
        y1, stages, last_stage = self.stepper.step(t0, y0, f0, dt, t1, self._time, buffer)
        accept, dt_next, _ratio, status = self.controller.step(y0, y1, stages, dt)
        self._last_nonfinite = status == py_controller.STATUS_NONFINITE
        if self._last_nonfinite and accept:
            raise NonFiniteStateError(
                f"NaN/Inf in the state or its derivative in the step from t={self._user_t(t0)!r} "
                f"(dt={dt!r} is already at min_step).")
        if self._last_nonfinite:
            self._nonfinite_trials += 1
            if self._nonfinite_trials > MAX_NONFINITE_TRIALS:
                raise NonFiniteStateError(
                    f"NaN/Inf in {self._nonfinite_trials} trial steps near t={self._user_t(t0)!r}: the solution "
                    "overflows or the dynamics are not finite there.")
        if not accept:
            self.dynamics.callback("callback_reject_step", t0, y0, dt)
            self.rejected += 1
            step.dt_next = dt_next
            return step

        self.dynamics.callback("callback_accept_step", t0, y0, dt)
        self.accepted += 1
        f1 = last_stage
        if on_step_t and self._next_step_t != len(self.step_t) - 1:
            self._next_step_t += 1
        if on_jump_t:
            if self._next_jump_t != len(self.jump_t) - 1:
                self._next_jump_t += 1
            f1 = self.dynamics(self._time(t1), y1, Perturb.NEXT)
        return _Step(t0, t1, y0, y1, stages, f1, dt_next, buffer)

    # ------------------------------------------------------------------ output
    def _dense(self, step, t_out):
        """State at ``t_out`` (float, or a tensor requiring grad) inside the last accepted step."""
        if isinstance(t_out, torch.Tensor):
            anchor, anchor_value = self.time_anchor
            t0 = anchor + (step.t0 - anchor_value)
            x = ((t_out.to(t0.dtype) - t0) / (step.t1 - step.t0)).to(self.y0.abs().dtype)
            return quartic_eval(x, step.y0, step.y1, step.stages, step.t1 - step.t0, self.tableau.b_mid)
        if t_out == step.t1:
            return step.y1
        x = (t_out - step.t0) / (step.t1 - step.t0)
        return quartic_eval(x, step.y0, step.y1, step.stages, step.t1 - step.t0, self.tableau.b_mid)

    def _locate_event(self, step, sign0, event_fn):
        """Bisection for the sign change of ``event_fn`` inside ``step`` (torchdiffeq's tolerance)."""
        tol = float(self.atol) if not isinstance(self.atol, torch.Tensor) else float(self.atol.min())
        lo, hi = step.t0, step.t1
        iterations = max(0, math.ceil(math.log((hi - lo) / tol) / math.log(2.0))) if tol > 0 else 64
        with torch.no_grad():
            for _ in range(iterations):
                mid = (lo + hi) / 2.0
                value = event_fn(torch.tensor(mid, dtype=torch.float64), self._dense(step, mid))
                if torch.sign(value) == sign0:
                    lo = mid
                else:
                    hi = mid
        event_t = torch.tensor((lo + hi) / 2.0, dtype=torch.float64)
        return event_t, self._dense(step, event_t if self.time_anchor is not None else event_t.item())

    def _report(self):
        record_solve(self.dynamics, self.accepted, self.rejected)


class _FusedController:
    """Adapter giving the C++ controller the Python controller's ``step`` signature."""

    def __init__(self, cpp):
        self.cpp = cpp

    def step(self, y0, y1, stages, dt):
        return self.cpp.step(y0.data_ptr(), y1.data_ptr(), stages.data_ptr(), stages.stride(0), dt)


class _TritonController(py_controller.StepController):
    """The Python controller with its error ratio from the fused Triton kernel (one launch pair and
    one host sync per step)."""

    def __init__(self, tableau, norm, y0, rtol, atol, **args):
        from .kernels.rk_stage import ErrorRatio

        super().__init__(error_weights=None, rtol=rtol, atol=atol, norm=norm, **args)
        self.fused_ratio = ErrorRatio(tableau.b_error, norm, y0.numel(), rtol, atol, y0.device)

    def error_ratio(self, y0, y1, stages, dt):
        return self.fused_ratio.value(y0, y1, stages, dt)


def _sorted_floats(values):
    if values is None:
        return []
    if isinstance(values, torch.Tensor):
        values = values.reshape(-1).tolist()
    return sorted(float(v) for v in values)


def _first_index_after(values, t0):
    """Index of the first value >= t0 (clamped to the last index), like torchdiffeq."""
    for index, value in enumerate(values):
        if value > t0:
            return index
    return max(len(values) - 1, 0)
