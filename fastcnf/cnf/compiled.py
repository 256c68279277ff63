"""``torch.compile`` for the fused divergence pass (opt-in: ``compile=True`` on the exact and
Hutchinson estimators, ``--compile`` in training). The passes are in ``fastcnf.cnf.divergence``:
``odenet_values`` (solves without gradients), ``odenet_vector_jacobian`` (``odeint_adjoint``'s backward
steps), and the forward and backward of ``OdenetPass`` (backprop through a solve).

In eager mode a CPU evaluation of the fused pass at batch 512 is about a third matrix products and
two thirds the fixed cost of some 50 (forward) or 180 (vector-Jacobian product) small tensor
operations. Compiled by inductor, the element-wise operations between the matrix products fuse into
a few loops. The passes are compiled for static shapes, once per (shape, dtype, activation), which
takes tens of seconds the first time in a process (inductor caches the code on disk). Where
compilation fails (no C++ compiler, an unsupported operation), one ``CompileWarning`` is issued and
the pass runs eagerly from then on.
"""

import warnings

import torch

__all__ = ["CompileWarning", "CompiledPass"]


class CompileWarning(UserWarning):
    """torch.compile of a fused pass failed; it runs eagerly."""


class CompiledPass:
    """``function`` through ``torch.compile(function, dynamic=False)``, compiled on first use;
    ``function`` itself after the compiler failed once."""

    def __init__(self, function):
        self.function = function
        self.compiled = None
        self.failed = False

    def __call__(self, *args):
        if not self.failed:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.function, dynamic=False)
                return self.compiled(*_canonical(args))
            except Exception as error:  # noqa: BLE001 - any compiler failure falls back to the eager pass
                self.failed = True
                warnings.warn(f"torch.compile of {self.function.__name__} failed ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); it runs eagerly.",
                              CompileWarning, stacklevel=2)
        return self.function(*args)


def _canonical(args):
    """``args`` with their tensors detached and contiguous (the passes run without autograd): torch.compile
    guards on requires_grad and strides, so inputs differing only in those would each compile a variant of
    their own (the first stage's state does not require grad, later ones do; a cotangent may be a strided
    view), and the variants count against its recompile limit, beyond which the pass runs eagerly."""
    return tuple(arg.detach().contiguous() if isinstance(arg, torch.Tensor) else arg for arg in args)
