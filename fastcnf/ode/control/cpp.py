"""The C++ twin of the reference controller (``fastcnf._C`` through ``fastcnf.ode.native``)."""

from ..native import CppStepController
from .interface import Decision, Status, StepSizeController

__all__ = ["CppController"]


class CppController(StepSizeController):
    """Error ratio and rule in one C++ call per step; float32/float64 CPU states, scalar tolerances and a
    ``SegmentNorm`` (``make_controller`` checks that)."""

    def __init__(self, rule, error_weights, rtol, atol, norm, dtype, numel):
        super().__init__(rule, error_weights, rtol, atol, norm)
        self.native = CppStepController(self.error_weights, rtol, atol, norm, rule, dtype, numel)

    def adapt(self, y0, y1, stages, dt, last_ratio=1.0):
        accept, dt_next, ratio, status, last_ratio = self.native.step(y0, y1, stages, dt, last_ratio)
        return Decision(accept, dt_next, ratio, Status(status), last_ratio)
