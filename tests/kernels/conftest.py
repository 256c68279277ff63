"""Kernel tests run on CPU through Triton's interpreter unless a CUDA device is there to run them.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here, before any test
module imports ``fastcnf.kernels``. Set ``TRITON_INTERPRET=0`` on a GPU machine to test the
compiled kernels on CUDA tensors instead.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device():
    """CUDA when a GPU is present and the interpreter is off, else CPU (interpreted kernels)."""
    if torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1":
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton backend (the solver uses it on CPU tensors only in this mode)."""
    monkeypatch.setenv("FASTCNF_BACKEND", "triton")
