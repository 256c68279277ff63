"""``python -m fastcnf info``: versions and which fast paths are available here."""

import platform

import torch

from .. import __version__
from ..ode.backend import HAS_EXT, HAS_TRITON, requested_backend, select_backend

__all__ = ["describe"]


def describe():
    """Multi-line report of versions, the C++ extension and the backends per device."""
    lines = [
        f"fastcnf {__version__}",
        f"python {platform.python_version()} ({platform.machine()})",
        f"torch {torch.__version__} (CUDA available: {torch.cuda.is_available()})",
        f"C++ extension fastcnf._C: {'built' if HAS_EXT else 'not built (pure-Python controller in use)'}",
    ]
    if HAS_TRITON:
        import triton

        lines.append(f"triton {triton.__version__}")
    else:
        lines.append("triton: not installed")
    lines.append(f"FASTCNF_BACKEND: {requested_backend()}")
    lines.append(_distributed_line())
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        try:
            backend = select_backend(torch.device(device))
        except RuntimeError as error:
            backend = f"unavailable ({error})"
        lines.append(f"backend on {device}: {backend}")
    return "\n".join(lines)


def _distributed_line():
    """Which torch.distributed backends multi-process training (torchrun) can use here."""
    import torch.distributed as dist

    if not dist.is_available():
        return "torch.distributed: not available (multi-process training needs it)"
    backends = {"gloo (CPU)": dist.is_gloo_available(), "nccl (CUDA)": dist.is_nccl_available()}
    return "torch.distributed: " + ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in backends.items())
