"""The C++ twin of the reference controller (``fastcnf._C`` through ``fastcnf.ode.native``)."""

from ..native import CppStepController
from .interface import StepSizeController

__all__ = ["CppController"]


class CppController(StepSizeController):
    """Error ratio and rule in one C++ call per step; float32/float64 CPU states, scalar tolerances and a
    ``SegmentNorm`` (``make_controller`` checks that)."""

    def __init__(self, rule, error_weights, rtol, atol, norm, dtype, numel):
        super().__init__(rule, error_weights, rtol, atol, norm)
        self.native = CppStepController(self.error_weights, rtol, atol, norm, rule, dtype, numel)
        # the checked C++ call itself: a plain (accept, dt_next, error_ratio, status, last_ratio) tuple in
        # Decision's order (status the int of its Status member), without a Python layer per step
        self.adapt = self.native.step
