"""Adaptive explicit Runge-Kutta solver (dopri5, tsit5, dopri8, bosh3, fehlberg2, adaptive_heun).

One stepper (``fastcnf.ode.explicit.stepper``) reads any tableau, and one step-size controller
(``fastcnf.ode.control``: Python reference, C++ or Triton, chosen per solve) judges every trial
step. This module is the host loop: time is kept as Python floats (float64), outside autograd two
stage buffers are reused for the whole solve, and the interpolant is evaluated only in steps that
contain an output time. On CUDA with the Triton backend the solve runs in
``fastcnf.ode.explicit.device_loop`` instead, which reads nothing back per step.

Step acceptance, the step-size rule, ``step_t``/``jump_t`` handling, perturbed evaluations at
step ends and the quartic dense output follow torchdiffeq, so both packages take the same
steps and return the same values (to rounding).
"""

import math

import torch

from ...errors import InvalidOptionError, NonFiniteStateError
from ...stats import record_solve
from ..backend import select_backend
from ..control import Status, StepRule, make_controller, pi_settings, solve_failure
from ..dynamics import CALLBACK_NAMES, Perturb
from ..events import EventSearch, event_tolerance, step_overflow, time_limit
from ..interpolation import quartic_eval
from ..validation import check_tolerance_resolution
from .device_loop import DEFAULT_CHECK_EVERY, integrate_on_device
from .stepper import ExplicitRKStepper
from .stiffness import StiffnessCheck

__all__ = ["AdaptiveRungeKutta", "AcceptedStep", "MAX_NONFINITE_TRIALS"]

# A solve gives up after this many trial steps with NaN/Inf in them. Shrinking the step recovers
# from a trial that overshoots into overflow within a few rejections; a solution that itself
# overflows would otherwise creep along at the float maximum, rejecting and accepting forever.
MAX_NONFINITE_TRIALS = 1000


class AcceptedStep:
    """The last accepted step [t0, t1] (floats), its stages, and what the next trial starts from
    (``last_ratio``: its error ratio, which the PI controller reads)."""

    __slots__ = ("t0", "t1", "y0", "y1", "stages", "f1", "dt_next", "buffer", "last_ratio")

    def __init__(self, t0, t1, y0, y1, stages, f1, dt_next, buffer, last_ratio=1.0):
        self.t0, self.t1, self.y0, self.y1 = t0, t1, y0, y1
        self.stages, self.f1, self.dt_next, self.buffer = stages, f1, dt_next, buffer
        self.last_ratio = last_ratio


class AdaptiveRungeKutta:
    """Adaptive solver for one tableau; see the module docstring.

    Args:
        dynamics: ``Dynamics`` of the problem (flat state).
        y0: (N,) initial state.
        rtol, atol: floats or (N,) tensors.
        tableau: an adaptive ``ButcherTableau``.
        norm: ``SegmentNorm`` (fast path) or any callable on an (N,) tensor.
        Other keyword arguments are torchdiffeq's options of the same names; ``device_loop`` and
        ``check_every`` choose and tune the device loop; ``controller`` (``"integral"``, torchdiffeq's,
        the default, or ``"pi"``) and the PI coefficients ``pcoeff``/``icoeff`` choose the step-size
        rule (``fastcnf.ode.control.StepRule``); ``stiffness`` ("warn", "error" or "off") the
        stiffness check of ``fastcnf.ode.explicit.stiffness``.
    """

    OPTIONS = frozenset({"norm", "first_step", "min_step", "max_step", "step_t", "jump_t", "safety", "ifactor",
                         "dfactor", "max_num_steps", "dtype", "device_loop", "check_every", "controller", "pcoeff",
                         "icoeff", "stiffness"})
    CALLBACKS = frozenset(CALLBACK_NAMES)

    def __init__(self, dynamics, y0, rtol, atol, *, tableau, norm, first_step=None, min_step=0.0,
                 max_step=math.inf, step_t=None, jump_t=None, safety=0.9, ifactor=10.0, dfactor=0.2,
                 max_num_steps=None, dtype=torch.float64, device_loop=None, check_every=DEFAULT_CHECK_EVERY,
                 controller="integral", pcoeff=None, icoeff=None, stiffness=None):
        check_tolerance_resolution(rtol, atol, y0)
        self.dynamics = dynamics
        self.y0 = y0
        self.rtol, self.atol = rtol, atol
        self.tableau = tableau
        self.norm = norm
        self.first_step = None if first_step is None else float(first_step)
        self.rule = StepRule(order=float(tableau.order), safety=float(safety), ifactor=float(ifactor),
                             dfactor=float(dfactor), min_step=float(min_step), max_step=float(max_step),
                             **pi_settings(controller, pcoeff, icoeff))
        self.max_num_steps_given = max_num_steps is not None
        self.max_num_steps = 2 ** 31 - 1 if max_num_steps is None else int(max_num_steps)
        self.step_t = _sorted_floats(step_t)
        self.jump_t = _sorted_floats(jump_t)
        if set(self.step_t) & set(self.jump_t):
            raise ValueError("`step_t` and `jump_t` must not have any repeated elements between them.")

        backend = select_backend(y0.device)
        self.stepper = ExplicitRKStepper(tableau, dynamics, y0.numel(), y0.dtype, y0.device)
        self.controller = make_controller(backend, self.rule, tableau.b_error, y0, rtol, atol, norm)
        self.device_loop = self._wants_device_loop(device_loop, backend)
        self.stiffness = StiffnessCheck(tableau, stiffness)
        self.check_every = int(check_every)
        self.time_anchor = None
        self.time_limit = time_limit(dynamics.real_dtype)
        self.last_step_size = None  # the step size proposed after the last step of integrate()
        self.accepted = self.rejected = 0
        self._last_nonfinite = False
        self._nonfinite_trials = 0

    @property
    def min_step(self):
        return self.rule.min_step

    @property
    def max_step(self):
        return self.rule.max_step

    def _wants_device_loop(self, requested, backend):
        """The sync-free loop: by default on CUDA with the Triton backend; never with step_t/jump_t or
        step callbacks."""
        eligible = not self.step_t and not self.jump_t and not any(
            self.dynamics.has_callback(name) for name in CALLBACK_NAMES)
        if requested is None:
            return eligible and self.y0.device.type == "cuda" and self.controller.on_device
        if requested and not eligible:
            raise InvalidOptionError("device_loop=True cannot be combined with step_t, jump_t or step callbacks.")
        return bool(requested)

    def _time(self, t):
        """What the dynamics receive for float time ``t``: the float, or a tensor tied to t[0]."""
        if self.time_anchor is None:
            return t
        anchor, anchor_value = self.time_anchor
        return anchor + (t - anchor_value)

    def _user_t(self, t):
        return -t if self.dynamics.reverse else t

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
                self.stiffness.begin(self._user_t(times[0]), self._user_t(times[-1]))
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
        search = EventSearch(event_fn, self.max_num_steps if self.max_num_steps_given else None, self._user_t)
        try:
            self.stiffness.begin(self._user_t(t0.item()))
            step = self._start(t0.item(), anchor)
            if search.start(step.t1, step.y1):
                event_t, y_event = torch.tensor(step.t1, dtype=torch.float64), step.y1
            else:
                while not search.crossed(step.t1, step.y1):
                    previous = step
                    while step is previous:
                        search.count_step(step.t1)
                        step = self._adaptive_step(step)
                event_t = torch.tensor(search.locate(step.t0, step.t1, lambda time: self._dense(step, time),
                                                     event_tolerance(self.atol)), dtype=torch.float64)
                y_event = self._dense(step, event_t if self.time_anchor is not None else event_t.item())
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
                self._check_budget(attempts, step)
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
            dt = self.controller.initial_step(self.dynamics, t0, self.y0, f0,
                                              self._time if anchor is not None else None)
        else:
            dt = self.first_step
        self._next_step_t = _first_index_after(self.step_t, t0)
        self._next_jump_t = _first_index_after(self.jump_t, t0)
        return AcceptedStep(t0, t0, self.y0, self.y0, None, f0, dt, buffer=1)

    def _advance(self, step, t_out):
        attempts = 0
        while t_out > step.t1:
            self._check_budget(attempts, step)
            step = self._adaptive_step(step)
            attempts += 1
        return step

    def _check_budget(self, attempts, step):
        if attempts >= self.max_num_steps:
            raise solve_failure(Status.FAILED_MAX_STEPS, self._user_t(step.t1), step.dt_next, self.max_num_steps)

    def _adaptive_step(self, step):
        """One trial step from ``step.t1``: a new ``AcceptedStep``, or ``step`` with a smaller dt."""
        t0, y0, f0 = step.t1, step.y1, step.f1
        rule = self.rule
        dt = step.dt_next
        if math.isnan(dt):
            dt = rule.min_step
        dt = min(max(dt, rule.min_step), rule.max_step)
        self.dynamics.callback("callback_step", t0, y0, dt)
        t1 = t0 + dt
        if not t1 > t0:
            raise solve_failure(Status.FAILED_UNDERFLOW, self._user_t(t0), dt, after_nonfinite=self._last_nonfinite)
        if max(abs(t1), dt) > self.time_limit:
            raise step_overflow(self._user_t(t0), dt, self.dynamics.real_dtype)

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
        decision = self.controller.adapt(y0, y1, stages, dt, step.last_ratio)
        if self.controller.on_device:
            decision = decision.to_host()
        accept, dt_next, _, status, last_ratio = decision
        self._last_nonfinite = status != Status.OK
        if self._last_nonfinite:
            self._count_nonfinite(status, t0, dt)
        if not accept:
            self.dynamics.callback("callback_reject_step", t0, y0, dt)
            self.rejected += 1
            step.dt_next = dt_next
            return step

        self.dynamics.callback("callback_accept_step", t0, y0, dt)
        self.accepted += 1
        self.stiffness.observe(stages, self._user_t(t1), dt)
        f1 = last_stage
        if on_step_t and self._next_step_t != len(self.step_t) - 1:
            self._next_step_t += 1
        if on_jump_t:
            if self._next_jump_t != len(self.jump_t) - 1:
                self._next_jump_t += 1
            f1 = self.dynamics(self._time(t1), y1, Perturb.NEXT)
        return AcceptedStep(t0, t1, y0, y1, stages, f1, dt_next, buffer, last_ratio)

    def _count_nonfinite(self, status, t0, dt):
        """A trial step had NaN/Inf in it: raise when the solve cannot go on."""
        if status == Status.FAILED_NONFINITE:
            raise solve_failure(status, self._user_t(t0), dt)
        self._nonfinite_trials += 1
        if self._nonfinite_trials > MAX_NONFINITE_TRIALS:
            raise NonFiniteStateError(
                f"non-finite values in state `y`: NaN/Inf in {self._nonfinite_trials} trial steps near "
                f"t={self._user_t(t0)!r}; the solution overflows or the dynamics are not finite there.")

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

    def _report(self):
        record_solve(self.dynamics, self.accepted, self.rejected)


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
