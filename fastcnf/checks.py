"""Input checking and normalisation shared by odeint, odeint_adjoint and odeint_event.

``prepare`` turns the user's arguments into a ``Problem``: a flat (N,) initial state, time in
increasing order (negated for reverse-time solves), the wrapped dynamics, tolerances and
validated options. Each check is a small function raising a clear error that names the bad
value.
"""

import math
import numbers
import warnings
from dataclasses import dataclass

import torch

from .dynamics import CALLBACK_NAMES, Dynamics, StateLayout
from .errors import (InvalidOptionError, InvalidStateError, InvalidTimeGridError, InvalidToleranceError,
                     NonFiniteStateError, UnknownMethodError)
from .norms import SegmentNorm
from .solvers import METHODS

__all__ = ["Problem", "prepare", "check_time", "check_method", "resolve_norm"]


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


def prepare(func, y0, t, rtol, atol, method, options, event_fn):
    """Validate and normalise the arguments of odeint (see the module docstring)."""
    check_state(y0)
    layout = StateLayout(y0)
    flat_y0 = layout.flatten(y0)
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
        _flip_time_options(options)

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


def check_state(y0):
    if isinstance(y0, torch.Tensor):
        parts = (y0,)
    elif isinstance(y0, tuple) and len(y0) > 0 and all(isinstance(part, torch.Tensor) for part in y0):
        parts = y0
    else:
        raise InvalidStateError(
            f"y0 must be a torch.Tensor or a non-empty tuple of torch.Tensors, got {type(y0).__name__}.")
    for index, part in enumerate(parts):
        if not (part.is_floating_point() or part.is_complex()):
            where = f"y0[{index}]" if isinstance(y0, tuple) else "y0"
            raise InvalidStateError(f"`{where}` must be a floating point Tensor but is a {part.type()}")
    if len({part.dtype for part in parts}) > 1:
        raise InvalidStateError(
            f"all tensors of a tuple state must share one dtype, got {[part.dtype for part in parts]}.")
    if len({part.device for part in parts}) > 1:
        raise ValueError(f"all tensors of a tuple state must be on one device, got {[str(p.device) for p in parts]}.")


def check_finite_state(flat_y0):
    if flat_y0.numel() and not bool(torch.isfinite(flat_y0).all()):
        raise NonFiniteStateError("y0 contains NaN or Inf values.")


def check_time(t, name="t"):
    """``t`` must be a 1-D floating point tensor, finite and strictly increasing or decreasing."""
    if not isinstance(t, torch.Tensor):
        raise InvalidTimeGridError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if not t.is_floating_point():
        raise TypeError(f"`{name}` must be a floating point Tensor but is a {t.type()}")
    if t.ndim != 1 or t.numel() == 0:
        raise InvalidTimeGridError(f"{name} must be one dimensional and non-empty, got shape {tuple(t.shape)}.")
    if not bool(torch.isfinite(t).all()):
        raise InvalidTimeGridError(f"{name} contains NaN or Inf: {t.tolist()}.")
    if len(t) > 1:
        increasing = t[1:] > t[:-1]
        decreasing = t[1:] < t[:-1]
        if not (bool(increasing.all()) or bool(decreasing.all())):
            bad = int((~increasing if bool(t[1] > t[0]) else ~decreasing).nonzero()[0])
            raise InvalidTimeGridError(
                f"{name} must be strictly increasing or decreasing; {name}[{bad}]={t[bad].item()!r} and "
                f"{name}[{bad + 1}]={t[bad + 1].item()!r} break the order.")


def check_method(method):
    if method is None:
        return "dopri5"
    if method not in METHODS:
        raise UnknownMethodError('Invalid method "{}". Must be one of {}'.format(
            method, '{"' + '", "'.join(METHODS) + '"}.'))
    return method


def check_options(method, options):
    """Copy of ``options`` after checking every name and value for ``method``."""
    options = {} if options is None else dict(options)
    accepted = METHODS[method].options
    for name in options:
        if name not in accepted:
            raise InvalidOptionError(
                f"Option {name!r} is not accepted by method {method!r}; it accepts: {', '.join(sorted(accepted))}.")
    for name, value in options.items():
        check = _OPTION_CHECKS.get(name)
        if check is not None:
            check(name, value)
    return options


def _positive_number(name, value):
    if not _is_real(value) or not float(value) > 0 or not math.isfinite(float(value)):
        raise InvalidOptionError(f"option {name!r} must be a positive finite number, got {value!r}.")


def _non_negative_number(name, value):
    if not _is_real(value) or not float(value) >= 0:
        raise InvalidOptionError(f"option {name!r} must be a non-negative number, got {value!r}.")


def _at_least_one(name, value):
    if not _is_real(value) or not float(value) >= 1:
        raise InvalidOptionError(f"option {name!r} must be a number >= 1, got {value!r}.")


def _fraction(name, value):
    if not _is_real(value) or not 0 < float(value) <= 1:
        raise InvalidOptionError(f"option {name!r} must be in (0, 1], got {value!r}.")


def _positive_integer(name, value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidOptionError(f"option {name!r} must be a positive integer, got {value!r}.")


def _callable(name, value):
    if not callable(value):
        raise InvalidOptionError(f"option {name!r} must be callable, got {value!r}.")


def _time_points(name, value):
    if isinstance(value, torch.Tensor):
        finite = bool(torch.isfinite(value).all())
    else:
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError(name)
            finite = all(math.isfinite(float(v)) for v in value)
        except (TypeError, ValueError):
            raise InvalidOptionError(f"option {name!r} must be a 1-D tensor of times, got {value!r}.") from None
    if not finite:
        raise InvalidOptionError(f"option {name!r} contains NaN or Inf.")


def _dtype(name, value):
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise InvalidOptionError(f"option {name!r} must be a floating torch.dtype, got {value!r}.")


def _optional_bool(name, value):
    if value is not None and not isinstance(value, bool):
        raise InvalidOptionError(f"option {name!r} must be True, False or None, got {value!r}.")


def _is_real(value):
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex()
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


_OPTION_CHECKS = {
    "step_size": _positive_number,
    "first_step": _positive_number,
    "max_step": _positive_number,
    "min_step": _non_negative_number,
    "safety": _positive_number,
    "ifactor": _at_least_one,
    "dfactor": _fraction,
    "max_num_steps": _positive_integer,
    "max_iters": _positive_integer,
    "max_order": _positive_integer,
    "grid_constructor": _callable,
    "norm": _callable,
    "step_t": _time_points,
    "jump_t": _time_points,
    "dtype": _dtype,
    "check_every": _positive_integer,
    "device_loop": _optional_bool,
}


def check_tolerance(name, tol, layout, flat_y0):
    """A float, or an (N,) tensor for per-element (or per-tuple-entry) tolerances."""
    if isinstance(tol, torch.Tensor) and tol.requires_grad:
        raise InvalidToleranceError(f"{name} cannot require gradient")
    if layout.is_tuple and isinstance(tol, (tuple, list)):
        if len(tol) != len(layout.shapes):
            raise InvalidToleranceError(f"If using tupled {name} it must have the same length as the tuple y0")
        parts = [torch.as_tensor(part, dtype=torch.float64).expand(size) for part, size in zip(tol, layout.sizes)]
        tol = torch.cat(parts)
    if isinstance(tol, torch.Tensor) and tol.numel() != 1:
        if tol.numel() != flat_y0.numel():
            tol = tol.expand(layout.shapes[0]) if not layout.is_tuple else tol
        tol = tol.reshape(-1).to(flat_y0.device)
        if bool((tol < 0).any()):
            raise InvalidToleranceError(f"{name} must be non-negative.")
        return tol
    value = float(tol)
    if not value >= 0:
        raise InvalidToleranceError(f"{name} must be a non-negative number, got {tol!r}.")
    return value


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


def _flip_time_options(options):
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
