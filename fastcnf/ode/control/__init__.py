"""Step-size control of the adaptive solvers: the interface, the status vocabulary and the one place
(``make_controller``) that picks the Python, C++ or Triton implementation for a solve."""

import torch

from ..norms import SegmentNorm
from .interface import (CONTROLLERS, PI_COEFFICIENTS, Decision, Status, StepRule, StepSizeController, pi_settings,
                        solve_failure)
from .reference import ReferenceController, propose_step, scaled_error_ratio

__all__ = ["Status", "StepRule", "Decision", "StepSizeController", "solve_failure", "make_controller", "CONTROLLERS",
           "PI_COEFFICIENTS", "pi_settings", "ReferenceController", "propose_step", "scaled_error_ratio"]

_FUSED_DTYPES = (torch.float32, torch.float64)


def make_controller(backend, rule, error_weights, y0, rtol, atol, norm):
    """The controller of one solve on ``backend`` (``fastcnf.ode.backend.select_backend``).

    The C++ and Triton twins need a float32/float64 state and a ``SegmentNorm`` (the C++ one also
    a CPU state and scalar tolerances); anything else runs on the reference.
    """
    fused = y0.dtype in _FUSED_DTYPES and isinstance(norm, SegmentNorm)
    if backend == "triton" and fused:
        from .triton import TritonController

        return TritonController(rule, error_weights, rtol, atol, norm, y0.numel(), y0.device)
    scalar_tolerances = not isinstance(rtol, torch.Tensor) and not isinstance(atol, torch.Tensor)
    if backend == "cpp" and fused and scalar_tolerances and y0.device.type == "cpu":
        from .cpp import CppController

        return CppController(rule, error_weights, rtol, atol, norm, y0.dtype, y0.numel())
    return ReferenceController(rule, error_weights, rtol, atol, norm, y0.dtype, y0.device)
