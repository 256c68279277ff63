"""The Triton twin of the reference controller: error ratio and step decision on the device.

Two launches per trial step (``fastcnf.kernels.rk_stage.ErrorRatio``: block partial sums, then one
program that reduces them and applies the ``StepRule``) and no host synchronization: ``adapt``
returns 0-dim device tensors, so the device loop runs without reading anything back, and the host
loop reads the whole decision in one transfer (``Decision.to_host``).
"""

from .interface import Decision, Status, StepSizeController

__all__ = ["TritonController"]


class TritonController(StepSizeController):
    """``adapt(y0, y1, stages, dt, last_ratio)`` with ``dt`` and ``last_ratio`` floats or 0-dim device tensors;
    returns device tensors."""

    on_device = True

    def __init__(self, rule, error_weights, rtol, atol, norm, numel, device):
        from ...kernels.rk_stage import ErrorRatio

        super().__init__(rule, error_weights, rtol, atol, norm)
        self.kernel = ErrorRatio(self.error_weights, norm, numel, rtol, atol, device)
        self.codes = (int(Status.OK), int(Status.NONFINITE), int(Status.FAILED_NONFINITE))

    def adapt(self, y0, y1, stages, dt, last_ratio=1.0):
        return Decision(*self.kernel.decide(y0, y1, stages, dt, self.rule, self.codes, last_ratio))
