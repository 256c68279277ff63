"""Every input check of fastcnf in one place: small named rules that raise a clear error naming
the bad value.

The generic rules (``require_positive``, ``require_positive_int``, ...) take the error class of
the caller's layer (``InvalidOptionError`` for solver options, ``ConfigError`` for training
settings, ``ValueError`` for the CNF modules). The ODE input checks (``check_state``,
``check_time``, ``check_option_values``, ``check_tolerance``) are what ``odeint``, ``odeint_adjoint``
and ``odeint_event`` run on their arguments; method and option names are looked up in the registry
(``fastcnf.ode.registry.check_method`` / ``check_options``).
"""

import math
import numbers
import os

import torch

from ..errors import (
    InvalidOptionError,
    InvalidStateError,
    InvalidTimeGridError,
    InvalidToleranceError,
    NonFiniteStateError,
)
from .control.interface import CONTROLLERS

__all__ = ["is_real_number", "require_positive", "require_non_negative", "require_positive_int", "require_choice",
           "require_bool", "require_fraction", "check_state", "check_finite_state", "check_time", "check_option_values",
           "strict_options", "check_tolerance", "check_tolerance_resolution"]


# ----------------------------------------------------------------------------------- generic rules
def is_real_number(value):
    """A real Python number (not a bool) or a one-element real tensor."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex() and not value.dtype == torch.bool
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def require_positive(name, value, error=ValueError):
    """``value`` is a finite number > 0; returns it as a float."""
    if not is_real_number(value) or not math.isfinite(float(value)) or not float(value) > 0:
        raise error(f"{name} must be a positive finite number, got {value!r}.")
    return float(value)


def require_non_negative(name, value, error=ValueError):
    """``value`` is a finite number >= 0; returns it as a float."""
    if not is_real_number(value) or not math.isfinite(float(value)) or not float(value) >= 0:
        raise error(f"{name} must be a finite number >= 0, got {value!r}.")
    return float(value)


def require_fraction(name, value, error=ValueError):
    """``value`` lies in (0, 1]; returns it as a float."""
    if not is_real_number(value) or not 0 < float(value) <= 1:
        raise error(f"{name} must be in (0, 1], got {value!r}.")
    return float(value)


def require_positive_int(name, value, error=ValueError):
    """``value`` is an integer >= 1 (a one-element integer tensor counts); returns it as an int."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise error(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def require_choice(what, value, choices, error=ValueError):
    """``value`` is one of ``choices``; returns it."""
    if value not in choices:
        raise error(f"unknown {what} {value!r}; choose one of {', '.join(map(str, choices))}.")
    return value


def require_bool(name, value, error=ValueError):
    """``value`` is True or False; returns it."""
    if not isinstance(value, bool):
        raise error(f"{name} must be True or False, got {value!r}.")
    return value


# ------------------------------------------------------------------------------------ ODE inputs
def check_state(y0):
    if isinstance(y0, torch.Tensor):
        parts = (y0,)
    elif isinstance(y0, tuple) and len(y0) > 0 and all(isinstance(part, torch.Tensor) for part in y0):
        parts = y0
    else:
        raise InvalidStateError(
            f"y0 must be either a torch.Tensor or a tuple (a non-empty one, of torch.Tensors), got "
            f"{type(y0).__name__}.")
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
        raise NonFiniteStateError("non-finite values in state `y`: y0 contains NaN or Inf values.")


def check_time(t, name="t"):
    """``t`` must be a 1-D floating point tensor, finite and strictly increasing or decreasing."""
    if not isinstance(t, torch.Tensor):
        raise InvalidTimeGridError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if not t.is_floating_point():
        raise TypeError(f"`{name}` must be a floating point Tensor but is a {t.type()}; convert it, e.g. "
                        f"{name}.double().")
    if t.ndim != 1 or t.numel() == 0:
        raise InvalidTimeGridError(f"{name} must be one dimensional and non-empty, got shape {tuple(t.shape)}.")
    if not bool(torch.isfinite(t).all()):
        raise InvalidTimeGridError(f"{name} must be strictly increasing or decreasing and finite; it contains NaN or "
                                   f"Inf: {t.tolist()}.")
    if len(t) > 1:
        increasing = t[1:] > t[:-1]
        decreasing = t[1:] < t[:-1]
        if not (bool(increasing.all()) or bool(decreasing.all())):
            bad = int((~increasing if bool(t[1] > t[0]) else ~decreasing).nonzero()[0])
            raise InvalidTimeGridError(
                f"{name} must be strictly increasing or decreasing; {name}[{bad}]={t[bad].item()!r} and "
                f"{name}[{bad + 1}]={t[bad + 1].item()!r} break the order.")


def strict_options():
    """``FASTCNF_STRICT_OPTIONS=1``: options a method does not use are errors instead of warnings."""
    return os.environ.get("FASTCNF_STRICT_OPTIONS", "0").strip() == "1"


# Options whose torchdiffeq default is None: passing None explicitly means the default.
_NONE_MEANS_DEFAULT = frozenset({"first_step", "step_t", "jump_t", "step_size", "grid_constructor"})


def check_option_values(options):
    """Check the value of every option whose name has a rule (names are checked by the registry).

    torchdiffeq's defaults given explicitly (``first_step=None``, ``max_step=float("inf")``, ...)
    are accepted.
    """
    for name, value in options.items():
        check = _OPTION_CHECKS.get(name)
        if check is not None and not (value is None and name in _NONE_MEANS_DEFAULT):
            check(name, value)


def _positive_number(name, value):
    require_positive(f"option {name!r}", value, InvalidOptionError)


def _positive_or_infinite(name, value):
    """A positive number, or +inf (torchdiffeq's ``max_step`` default)."""
    if not (is_real_number(value) and float(value) == math.inf):
        _positive_number(name, value)


def _non_negative_number(name, value):
    if not is_real_number(value) or not float(value) >= 0:
        raise InvalidOptionError(f"option {name!r} must be a non-negative number, got {value!r}.")


def _at_least_one(name, value):
    if not is_real_number(value) or not float(value) >= 1:
        raise InvalidOptionError(f"option {name!r} must be a number >= 1, got {value!r}.")


def _fraction(name, value):
    require_fraction(f"option {name!r}", value, InvalidOptionError)


def _positive_integer(name, value):
    require_positive_int(f"option {name!r}", value, InvalidOptionError)


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


def _controller(name, value):
    require_choice(f"option {name!r}", value, CONTROLLERS, InvalidOptionError)


def _stiffness(name, value):
    from .explicit.stiffness import STIFFNESS_CHOICES

    require_choice(f"option {name!r} value", value, STIFFNESS_CHOICES, InvalidOptionError)


def _optional_bool(name, value):
    if value is not None and not isinstance(value, bool):
        raise InvalidOptionError(f"option {name!r} must be True, False or None, got {value!r}.")


_OPTION_CHECKS = {
    "step_size": _positive_number,
    "first_step": _positive_number,
    "max_step": _positive_or_infinite,
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
    "controller": _controller,
    "pcoeff": _non_negative_number,
    "icoeff": _positive_number,
    "stiffness": _stiffness,
}


def check_tolerance(name, tol, layout, flat_y0):
    """``rtol`` or ``atol`` as a float, or as an (N,) tensor of per-element tolerances.

    Accepted: a non-negative number; a tensor that broadcasts to the state's shape (or has its N
    elements); for a tuple state also a tuple (or a tensor) with one number or tensor per entry, as
    in torchdiffeq. Entries must be non-negative and not NaN (+inf is allowed: no error control there).
    """
    if isinstance(tol, torch.Tensor) and tol.requires_grad:
        raise InvalidToleranceError(f"{name} cannot require gradient; pass {name}.detach().")
    shapes = layout.shapes
    if layout.is_tuple and isinstance(tol, torch.Tensor) and tol.dim() == 1 and tol.numel() == len(shapes) != 1 \
            and tol.numel() != layout.numel:
        tol = tuple(tol)  # torchdiffeq iterates a tensor tolerance of a tuple state: one entry per tensor
    if layout.is_tuple and isinstance(tol, (tuple, list)):
        if len(tol) != len(shapes):
            raise InvalidToleranceError(f"If using tupled {name} it must have the same length as the tuple y0: got "
                                        f"{len(tol)} entries for {len(shapes)} tensors.")
        tol = torch.cat([_per_element(f"{name}[{index}]", torch.as_tensor(part, dtype=torch.float64), shape)
                         for index, (part, shape) in enumerate(zip(tol, shapes))])
    elif isinstance(tol, torch.Tensor) and tol.numel() != 1:
        if layout.is_tuple and tol.numel() != layout.numel:
            raise InvalidToleranceError(
                f"{name} for a tuple state must be a number, a tuple with one entry per tensor, or a tensor of its "
                f"{layout.numel} elements; got a tensor of shape {tuple(tol.shape)}.")
        tol = _per_element(name, tol, shapes[0] if not layout.is_tuple else torch.Size([layout.numel]))
    if isinstance(tol, torch.Tensor) and tol.numel() != 1:
        _require_valid_entries(name, tol)
        return tol.to(flat_y0.device)
    if isinstance(tol, torch.Tensor):
        tol = tol.item()
    if not is_real_number(tol) or not float(tol) >= 0:
        raise InvalidToleranceError(f"{name} must be a non-negative number, got {tol!r}.")
    return float(tol)


def _per_element(name, tol, shape):
    """``tol`` broadcast to ``shape`` (or holding its elements) as a flat tensor."""
    if tol.numel() == shape.numel():
        return tol.reshape(-1)
    try:
        return torch.broadcast_to(tol, shape).reshape(-1)
    except RuntimeError:
        raise InvalidToleranceError(f"{name} of shape {tuple(tol.shape)} does not broadcast to the state's shape "
                                    f"{tuple(shape)}.") from None


def _require_valid_entries(name, tol):
    bad = torch.isnan(tol) | (tol < 0)
    if bool(bad.any()):
        index = int(bad.nonzero()[0])
        raise InvalidToleranceError(f"{name} must be non-negative and not NaN, got {tol[index].item()!r} at flat "
                                    f"index {index}.")


def check_tolerance_resolution(rtol, atol, y0):
    """Refuse tolerances finer than what the state's dtype resolves (adaptive step-size control).

    The rule: with eps the dtype's machine epsilon and s = max(1, |y0|) per element, the tolerance
    ``atol + rtol * s`` must be at least ``eps**2 * s``. Why eps**2: the error estimate is a
    combination of stages that each carry a rounding error of about eps relative, so below a tolerance
    tol it is noise and the controller shrinks the step until h * eps ~ tol; the state then changes by
    h * |f| ~ tol / eps per step, which rounds away once it is below eps * |y| -- once tol < eps**2
    (for |f| ~ |y|). The state stops moving and the solve returns y0 or wanders (bfloat16 at the
    default rtol=1e-7 returned 0.984 for exp(-1)). Bounds: float32 eps**2 = 1.4e-14 (torchdiffeq's
    default rtol=1e-7 is far above it, and float32 behaves exactly as before), bfloat16 6.1e-5,
    float16 9.5e-7, float64 4.9e-32. s = max(1, |y0|) judges a state that starts at 0 at unit scale.
    """
    if not y0.is_floating_point() or y0.numel() == 0:
        return
    eps = torch.finfo(y0.dtype).eps
    floor = eps * eps
    if _smallest(rtol) >= floor:  # atol >= 0: the usual case, decided without looking at y0
        return
    with torch.no_grad():
        scale = y0.detach().abs().double().clamp(min=1.0)
        rtol_t = torch.as_tensor(rtol, dtype=torch.float64, device=y0.device)
        atol_t = torch.as_tensor(atol, dtype=torch.float64, device=y0.device)
        short = (atol_t + rtol_t * scale) < floor * scale
        if not bool(short.any()):
            return
    raise InvalidToleranceError(
        f"rtol={_describe_tolerance(rtol)}, atol={_describe_tolerance(atol)} ask for more than a {y0.dtype} state "
        f"resolves: its resolution is eps={eps:.3g}, and below a tolerance of eps**2={floor:.2g} (relative to the "
        f"state, or absolute where |y| < 1) rounding noise drives the step size until the steps no longer change "
        f"the state. Pass rtol >= {floor:.2g} (or a larger atol), or use a wider dtype such as float32.")


def _smallest(tol):
    return float(tol.min()) if isinstance(tol, torch.Tensor) else float(tol)


def _describe_tolerance(tol):
    if isinstance(tol, torch.Tensor) and tol.numel() > 1:
        return f"tensor(min={float(tol.min()):.3g})"
    return f"{float(tol):.3g}"
