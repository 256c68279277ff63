"""The method registry: every ``method=`` name, its solver class and its fixed arguments."""

from dataclasses import dataclass, field

from .adams import Adams
from .fixed_grid import FixedGridRungeKutta
from .implicit_rk import ImplicitRungeKutta
from .implicit_tableaus import IMPLICIT_TABLEAUS
from .rk_adaptive import AdaptiveRungeKutta
from .scipy_solver import ScipySolver
from .tableaus import ADAPTIVE_TABLEAUS, FIXED_TABLEAUS

__all__ = ["Method", "METHODS", "register_method"]


@dataclass(frozen=True)
class Method:
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

    def build(self, dynamics, y0, rtol, atol, options):
        return self.solver(dynamics, y0, rtol, atol, **self.fixed, **options)


METHODS = {}
METHODS.update({name: Method(AdaptiveRungeKutta, {"tableau": tab}) for name, tab in ADAPTIVE_TABLEAUS.items()})
METHODS.update({name: Method(FixedGridRungeKutta, {"tableau": tab}) for name, tab in FIXED_TABLEAUS.items()})
METHODS.update({name: Method(ImplicitRungeKutta, {"tableau": tab}) for name, tab in IMPLICIT_TABLEAUS.items()})
METHODS["explicit_adams"] = Method(Adams, {"implicit": False})
METHODS["implicit_adams"] = Method(Adams, {"implicit": True})
METHODS["fixed_adams"] = METHODS["implicit_adams"]
METHODS["scipy_solver"] = Method(ScipySolver)


def register_method(name, method):
    """Add a method under ``name`` (used by extensions)."""
    METHODS[name] = method
