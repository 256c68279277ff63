"""Which implementation runs the hot paths of a solve, chosen per device.

* ``torch``: the pure-torch reference (Python controller, torch stage arithmetic). Always
  available; every other backend is tested against it.
* ``cpp``: the C++ extension (``fastcnf.ode.native``) combines the stages and runs the fused
  error ratio and step-size rule. The default on CPU when the extension is built.
* ``triton``: the fused Triton kernels of ``fastcnf.kernels`` combine the stages and compute the
  error ratio and the step decision on the device; the default for CUDA tensors when Triton is
  installed. On CPU tensors it needs ``TRITON_INTERPRET=1`` (used by the tests).

``FASTCNF_BACKEND=torch|cpp|triton`` forces one; ``auto`` (default) picks per device.
"""

import importlib.util
import os

from .native import HAS_EXT

__all__ = ["BACKENDS", "HAS_EXT", "HAS_TRITON", "requested_backend", "select_backend", "triton_interpret"]

BACKENDS = ("auto", "torch", "cpp", "triton")

HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_interpret():
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend():
    """The ``FASTCNF_BACKEND`` setting (``auto`` when unset)."""
    name = os.environ.get("FASTCNF_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FASTCNF_BACKEND={name!r} is not one of {', '.join(BACKENDS)}.")
    return name


def select_backend(device):
    """The backend for tensors on ``device`` (a torch.device)."""
    name = requested_backend()
    if name == "auto":
        if device.type == "cuda" and HAS_TRITON:
            return "triton"
        return "cpp" if HAS_EXT and device.type == "cpu" else "torch"
    if name == "cpp" and not HAS_EXT:
        raise RuntimeError("FASTCNF_BACKEND=cpp but the C++ extension fastcnf._C is not built.")
    if name == "triton":
        if not HAS_TRITON:
            raise RuntimeError("FASTCNF_BACKEND=triton but triton is not installed (pip install triton).")
        if device.type != "cuda" and not triton_interpret():
            raise RuntimeError("FASTCNF_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1.")
    return name
