"""The problem layer shared by odeint, odeint_adjoint and odeint_event.

``prepare`` turns the user's arguments, checked by ``fastcnf.ode.validation``, into a ``Problem``:
a flat contiguous (N,) initial state, time in increasing order (negated for reverse-time solves),
the wrapped dynamics, tolerances, the error norm and validated options.
"""

import warnings
from dataclasses import dataclass

import torch

from .dynamics import CALLBACK_NAMES, Dynamics, StateLayout
from .norms import SegmentNorm
from .registry import METHODS, check_method, check_options
from .validation import check_finite_state, check_state, check_time, check_tolerance

__all__ = ["Problem", "prepare", "resolve_norm", "flip_time_options", "EventFunction"]


@dataclass
class Problem:
    """A normalised solve: everything a solver needs, in its internal orientation."""

    layout: StateLayout
    dynamics: Dynamics
    y0: torch.Tensor  # (N,)
    t: torch.Tensor  # (T,) increasing
    rtol: object  # float or (N,) tensor
    atol: object
    method: str
    options: dict
    event_fn: object
    reverse: bool

    def build_solver(self):
        return METHODS[self.method].build(self.dynamics, self.y0, self.rtol, self.atol, self.options)

    def unflatten_solution(self, solution):
        """(T, N) -> user layout with a leading time dimension."""
        return self.layout.unflatten(solution)

    def event_solution_dtype(self, solution):
        """The (2, N) solution of an event solve in torchdiffeq's dtype: on a fixed grid its state is
        y0 + dt * f, so a wider floating ``func`` result (float64 for a float32 state) widens it."""
        result = self.dynamics.result_dtype
        if not METHODS[self.method].fixed_grid or result is None or not result.is_floating_point:
            return solution
        return solution.to(torch.promote_types(solution.dtype, result))


def prepare(func, y0, t, rtol, atol, method, options, event_fn):
    """Validate and normalise the arguments of odeint (see the module docstring)."""
    check_state(y0)
    layout = StateLayout(y0)
    flat_y0 = layout.flatten(y0).contiguous()
    check_time(t)
    method = check_method(method)
    options = check_options(method, options)
    if event_fn is not None and len(t) != 2:
        raise ValueError(f"We require len(t) == 2 when in event handling mode, but got len(t)={len(t)}.")
    check_finite_state(flat_y0)

    if t.device != flat_y0.device:
        warnings.warn("t is not on the same device as y0. Coercing to y0.device.")
        t = t.to(flat_y0.device)

    reverse = len(t) > 1 and bool(t[0] > t[1])
    if reverse:
        t = -t
        flip_time_options(options)

    rtol = check_tolerance("rtol", rtol, layout, flat_y0)
    atol = check_tolerance("atol", atol, layout, flat_y0)
    options["norm"] = resolve_norm(options.get("norm"), layout)
    if "norm" not in METHODS[method].options:
        options.pop("norm")

    dynamics = Dynamics(func, layout, reverse, flat_y0.dtype, flat_y0.device)
    unsupported = {name for name in CALLBACK_NAMES if dynamics.has_callback(name)} - METHODS[method].callbacks
    if unsupported:
        warnings.warn(f"Solver '{method}' does not support callbacks {unsupported}")
    if event_fn is not None:
        event_fn = EventFunction(event_fn, layout, reverse, t[0], flat_y0)
    return Problem(layout, dynamics, flat_y0, t, rtol, atol, method, options, event_fn, reverse)


def resolve_norm(norm, layout):
    """The flat-state norm: fused segment RMS by default, else the user's norm in their layout."""
    if norm is None:
        return SegmentNorm.from_sizes(layout.sizes)
    if isinstance(norm, SegmentNorm):
        return norm
    return _UserNorm(norm, layout)


class _UserNorm:
    """A user norm applied to the state in the user's layout (tensor shape or tuple)."""

    def __init__(self, norm, layout):
        self.norm, self.layout = norm, layout

    def __call__(self, flat):
        return self.norm(self.layout.unflatten(flat))


def flip_time_options(options):
    """Express time-valued options in the negated time of a reverse solve."""
    for name in ("step_t", "jump_t"):
        if name in options:
            options[name] = -torch.as_tensor(options[name])
    if "grid_constructor" in options:
        user_grid = options["grid_constructor"]
        options["grid_constructor"] = lambda func, y0, t: -user_grid(func, y0, -t)


class EventFunction:
    """The user's ``event_fn(t, y)`` on the flat state and internal time, combined to one scalar.

    Several event values are combined as torchdiffeq does: each is multiplied by its sign at
    the start, and the minimum is taken, so the combined value changes sign when any does.
    """

    def __init__(self, event_fn, layout, reverse, t0, flat_y0):
        self.event_fn, self.layout, self.reverse = event_fn, layout, reverse
        with torch.no_grad():
            self.initial_signs = torch.sign(self._raw(t0, flat_y0))

    def _raw(self, t, flat):
        t = torch.as_tensor(t)
        return self.event_fn(-t if self.reverse else t, self.layout.unflatten(flat))

    def __call__(self, t, flat):
        return torch.min(self._raw(t, flat) * self.initial_signs)
