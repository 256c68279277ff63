"""Every kernel launch the host wrappers make also compiles for a real GPU (sm_90), without one.

The interpreter accepts code the compiler rejects (re-assigned constexprs, loop-carried type
changes, float32 scalar arguments), so the launches recorded on CPU are compiled here to
PTX/cubin for CUDA with Triton's own toolchain. Compilation runs in a fresh process with the
interpreter off: Triton 3.9's interpreter leaves ``triton.language`` patched after a kernel calls
another jitted function, which breaks compilation in the same process.
"""

import inspect
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from fastcnf.kernels import hutchinson, rk_stage  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from fastcnf.cnf.mlp_spec import ACTIVATIONS, MLPSpec  # noqa: E402
from fastcnf.ode.control import StepRule  # noqa: E402
from fastcnf.ode.explicit import tableaus  # noqa: E402
from fastcnf.ode.norms import SegmentNorm  # noqa: E402

pytestmark = [
    pytest.mark.skipif("nvidia" not in triton.backends.backends, reason="Triton's CUDA compiler backend is missing"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="with a GPU the other tests compile"),
]

KERNELS = {rk_stage: ["_stage_combine_kernel", "_error_partials_kernel", "_error_finalize_kernel"],
           hutchinson: ["_hutchinson_kernel"]}

COMPILE = """
import ast, importlib, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

for module, name, signature, constexprs in ast.literal_eval(sys.stdin.read()):
    kernel = getattr(importlib.import_module(module), name)
    binary = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
    print(name, len(binary.asm["cubin"]))
"""


def _record(monkeypatch, launches):
    """Replace each kernel's ``run`` by one that records its arguments, then runs it."""
    for module, names in KERNELS.items():
        for name in names:
            kernel = getattr(module, name)

            def run(*args, grid, warmup, _run=kernel.run, _key=(module, name), **kwargs):
                launches.append((_key, args, kwargs))
                return _run(*args, grid=grid, warmup=warmup, **kwargs)

            monkeypatch.setattr(kernel, "run", run)


def _signature(fn, args, kwargs):
    """Triton's signature and constexprs for a launch of ``fn`` with these arguments."""
    parameters = inspect.signature(fn).parameters
    values = dict(zip(parameters, args), **kwargs)
    signature, constexprs = {}, {}
    for name, parameter in parameters.items():
        if parameter.annotation is tl.constexpr:
            signature[name], constexprs[name] = "constexpr", values[name]
        elif isinstance(parameter.annotation, tl.dtype):
            signature[name] = parameter.annotation.name
        else:
            signature[name] = mangle_type(values[name])
    return signature, constexprs


def _launch_everything():
    """One call of every host wrapper in each configuration that compiles a distinct kernel."""
    for dtype in (torch.float32, torch.float64):
        y0 = torch.randn(3000, dtype=dtype)
        stages = torch.randn(tableaus.DOPRI5.stages, 3000, dtype=dtype)
        dt = torch.tensor(0.1, dtype=torch.float64)  # the device loop's step size
        combiner = rk_stage.TritonStageCombiner(tableaus.DOPRI5.a, tableaus.DOPRI5.b, dtype, "cpu")
        combiner.solution(y0, stages, 0.1)
        combiner.stage(3, y0, stages, dt)
        norm = SegmentNorm.from_sizes([1000, 2000])
        for rtol, atol in ((1e-5, 1e-7), (torch.full((3000,), 1e-5), torch.full((3000,), 1e-7))):
            rk_stage.fused_error_ratio(y0, y0, stages, tableaus.DOPRI5.b_error, 0.1, rtol, atol, norm)
        rule = StepRule(order=5.0)
        ratio = rk_stage.ErrorRatio(tableaus.DOPRI5.b_error, norm, 3000, 1e-5, 1e-7, "cpu")
        ratio.decide(y0, y0, stages, dt, rule, (0, 1, 2))
        ratio.decide(y0, y0, stages, 0.1, rule, (0, 1, 2))
    for activation in ACTIVATIONS:
        _hutchinson_call((2, 64, 64, 2), activation, torch.float32, requires_grad=activation == "softplus")
    _hutchinson_call((3, 9, 3), "tanh", torch.float64, requires_grad=True)
    _hutchinson_call((5, hutchinson.MAX_WIDTH, hutchinson.MAX_WIDTH, 5), "swish", torch.float32, requires_grad=True)


def _hutchinson_call(widths, activation, dtype, requires_grad):
    weights = tuple(torch.randn(widths[k + 1], widths[k] + 1, dtype=dtype, requires_grad=requires_grad)
                    for k in range(len(widths) - 1))
    biases = tuple(torch.randn(width, dtype=dtype) for width in widths[1:])
    z = torch.randn(40, widths[0], dtype=dtype)
    hutchinson.hutchinson_mlp(MLPSpec(weights, biases, activation, "all"), 0.5, z, torch.randn_like(z))


def test_every_launch_compiles_for_sm90(monkeypatch, triton_backend):
    launches = []
    _record(monkeypatch, launches)
    _launch_everything()
    jobs = []
    for (module, name), args, kwargs in launches:
        signature, constexprs = _signature(getattr(module, name).fn, args, kwargs)
        job = (module.__name__, name, signature, constexprs)
        if job not in jobs:
            jobs.append(job)
    assert {job[1] for job in jobs} == {name for names in KERNELS.values() for name in names}
    # combine: 2 dtypes x dt (value, device); partials: 2 dtypes x (scalar, per-element tolerances, device dt);
    # finalize: ratio only, decision with dt value, decision with device dt; hutchinson: 7
    assert len(jobs) == 4 + 6 + 3 + 7
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-c", COMPILE], input=repr(jobs), env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    cubins = [line.split() for line in result.stdout.splitlines()]
    assert len(cubins) == len(jobs) and all(int(size) > 0 for _, size in cubins)
