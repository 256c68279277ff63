"""The ODE method registry: every ``method=`` name, its solver class and its fixed arguments, and the
lookups that check a method name and the option names a method accepts."""

import warnings
from dataclasses import dataclass, field

from ..errors import IgnoredOptionWarning, InvalidOptionError, UnknownMethodError
from .explicit.adaptive import AdaptiveRungeKutta
from .explicit.fixed_grid import FixedGridRungeKutta, FixedGridSolver
from .explicit.tableaus import ADAPTIVE_TABLEAUS, FIXED_TABLEAUS
from .implicit.runge_kutta import ImplicitRungeKutta
from .implicit.tableaus import IMPLICIT_TABLEAUS
from .multistep.adams import Adams
from .scipy_solver import ScipySolver
from .validation import check_option_values, strict_options

__all__ = ["OdeMethod", "METHODS", "register_method", "check_method", "check_options"]


@dataclass(frozen=True)
class OdeMethod:
    """A solver class plus the keyword arguments that make it a specific method."""

    solver: type
    fixed: dict = field(default_factory=dict)

    @property
    def options(self):
        """Option names a user may pass for this method."""
        return self.solver.OPTIONS

    @property
    def callbacks(self):
        return self.solver.CALLBACKS

    @property
    def adaptive(self):
        return self.solver is AdaptiveRungeKutta

    @property
    def fixed_grid(self):
        return issubclass(self.solver, FixedGridSolver)

    def build(self, dynamics, y0, rtol, atol, options):
        return self.solver(dynamics, y0, rtol, atol, **self.fixed, **options)


METHODS = {}
METHODS.update({name: OdeMethod(AdaptiveRungeKutta, {"tableau": tab}) for name, tab in ADAPTIVE_TABLEAUS.items()})
METHODS.update({name: OdeMethod(FixedGridRungeKutta, {"tableau": tab}) for name, tab in FIXED_TABLEAUS.items()})
METHODS.update({name: OdeMethod(ImplicitRungeKutta, {"tableau": tab}) for name, tab in IMPLICIT_TABLEAUS.items()})
METHODS["explicit_adams"] = OdeMethod(Adams, {"implicit": False})
METHODS["implicit_adams"] = OdeMethod(Adams, {"implicit": True})
METHODS["fixed_adams"] = METHODS["implicit_adams"]
METHODS["scipy_solver"] = OdeMethod(ScipySolver)


def register_method(name, method):
    """Add a method under ``name`` (used by extensions)."""
    METHODS[name] = method


def check_method(method):
    """``method`` if it names a registered method (None means ``"dopri5"``)."""
    if method is None:
        return "dopri5"
    if method not in METHODS:
        raise UnknownMethodError('Invalid method "{}". Must be one of {}'.format(
            method, '{"' + '", "'.join(METHODS) + '"}.'))
    return method


def check_options(method, options):
    """Copy of ``options`` without the names ``method`` does not use, after checking every value.

    An option the method does not use is ignored with an ``IgnoredOptionWarning`` (torchdiffeq warns
    about it too: scripts commonly pass ``step_size`` to dopri5), or refused with an
    ``InvalidOptionError`` under ``FASTCNF_STRICT_OPTIONS=1``.
    """
    options = {} if options is None else dict(options)
    accepted = METHODS[method].options
    for name in [name for name in options if name not in accepted]:
        message = (f"Option {name!r} is not used by method {method!r}{_why_unused(method, name)}; it accepts: "
                   f"{', '.join(sorted(accepted))}.")
        if strict_options():
            raise InvalidOptionError(message)
        warnings.warn(f"{message} It is ignored (FASTCNF_STRICT_OPTIONS=1 makes this an error).",
                      IgnoredOptionWarning, stacklevel=4)
        del options[name]
    check_option_values(options)
    return options


_STEP_OPTIONS = frozenset({"step_size", "grid_constructor", "perturb", "interp"})
_ADAPTIVE_OPTIONS = frozenset(AdaptiveRungeKutta.OPTIONS)


def _why_unused(method, name):
    """A reason for the common mix-ups: grid options on adaptive methods and the other way round."""
    if METHODS[method].adaptive and name in _STEP_OPTIONS:
        return " (an adaptive method chooses its own steps)"
    if METHODS[method].fixed_grid and name in _ADAPTIVE_OPTIONS:
        return " (a fixed-grid method takes the steps of its grid)"
    return ""
