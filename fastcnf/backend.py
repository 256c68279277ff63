"""Which implementation runs the hot paths.

* ``torch``: the pure-torch reference (Python controller). Always available; every other
  backend is tested against it.
* ``cpp``: torch stage arithmetic plus the fused C++ error-ratio/controller (``fastcnf._C``).
  The default on CPU when the extension is built.
* ``triton``: fused Triton kernels; the default for CUDA tensors when Triton is installed.
  On CPU tensors it needs ``TRITON_INTERPRET=1`` (used by the tests).

``FASTCNF_BACKEND=torch|cpp|triton`` forces one; ``auto`` (default) picks per device.
"""

import importlib.util
import os
import warnings

__all__ = ["HAS_EXT", "HAS_TRITON", "ext", "select_backend", "BACKENDS"]

BACKENDS = ("auto", "torch", "cpp", "triton")

try:
    from . import _C as ext

    HAS_EXT = True
except ImportError as _error:  # the package still works, with the Python controller
    ext = None
    HAS_EXT = False
    warnings.warn(
        f"fastcnf: the C++ extension fastcnf._C is not available ({_error}); using the pure-Python "
        "step-size controller. Reinstall with a C++ compiler to build it.",
        RuntimeWarning,
        stacklevel=2,
    )

HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_interpret():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend():
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
        return "cpp" if HAS_EXT else "torch"
    if name == "cpp" and not HAS_EXT:
        raise RuntimeError("FASTCNF_BACKEND=cpp but the C++ extension fastcnf._C is not built.")
    if name == "triton":
        if not HAS_TRITON:
            raise RuntimeError("FASTCNF_BACKEND=triton but triton is not installed (pip install triton).")
        if device.type != "cuda" and not triton_interpret():
            raise RuntimeError("FASTCNF_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1.")
    return name
