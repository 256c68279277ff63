"""Triton kernels against their torch references on a CUDA device (skipped without one).

    python -m pytest bench/bench_kernels.py --benchmark-enable --benchmark-json=bench/results/kernels.json

Every group times the fused kernel and the torch code it replaces on identical inputs (fixed
seeds); report the ratio fused/reference per group, with the GPU's name (``gpu`` in
``extra_info``). Each timed call ends with ``torch.cuda.synchronize()`` so device time counts;
one untimed call first compiles the kernels.

* ``stage-*``: one stage combination ``y0 + dt * sum_j a_ij k_j`` (dopri5, row 5, five non-zero
  weights): ``StageCombiner.stage`` vs ``torch.addmv`` (the autograd path) and the in-place adds
  (the no-grad CPU path).
* ``ratio-*``: the scaled error ratio with its host sync: ``ErrorRatio.value`` vs
  ``fastcnf.ode.control.reference.scaled_error_ratio``.
* ``hutchinson-*``: f and eps^T (df/dz) eps of a CNF MLP (2 -> 64x3 -> 2 and 2 -> 128x3 -> 2,
  softplus, time on every layer), forward and forward+backward: the fused kernel vs
  ``torch.func.jvp`` and vs the autograd vector-Jacobian-product estimator CNF code uses.
"""

import pytest
import torch

pytest.importorskip("triton")

from fastcnf.kernels import hutchinson, rk_stage  # noqa: E402

from fastcnf.cnf.mlp_spec import MLPSpec  # noqa: E402
from fastcnf.kernels.tangent_mlp import mlp_reference  # noqa: E402
from fastcnf.ode.control.reference import scaled_error_ratio  # noqa: E402
from fastcnf.ode.explicit import tableaus  # noqa: E402
from fastcnf.ode.norms import SegmentNorm  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel benchmarks need a CUDA device")

DEVICE = "cuda"
STATE_SIZES = [2 * 512, 64 * 1024, 2 ** 22]
TABLEAU = tableaus.DOPRI5
ROW = 5


def _synchronized(function, *args):
    def call():
        result = function(*args)
        torch.cuda.synchronize()
        return result

    return call


def _gpu_info(benchmark, **info):
    benchmark.extra_info.update(gpu=torch.cuda.get_device_name(), **info)


def _stage_inputs(numel, dtype):
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    y0 = torch.randn(numel, generator=generator, dtype=dtype, device=DEVICE)
    stages = torch.randn(TABLEAU.stages, numel, generator=generator, dtype=dtype, device=DEVICE)
    return y0, stages


def _inplace_combine(y0, stages, weights, dt):
    out = y0.clone()
    for j, weight in enumerate(weights):
        if weight != 0:
            out.add_(stages[j], alpha=weight * dt)
    return out


@pytest.mark.parametrize("numel", STATE_SIZES)
@pytest.mark.parametrize("implementation", ["triton", "addmv", "inplace"])
def test_stage_combination(benchmark, implementation, numel):
    benchmark.group = f"stage-float32-N{numel}"
    y0, stages = _stage_inputs(numel, torch.float32)
    weights = TABLEAU.a[ROW]
    if implementation == "triton":
        combiner = rk_stage.StageCombiner(TABLEAU.a, TABLEAU.b, torch.float32, y0.device)
        call = _synchronized(combiner.stage, ROW, y0, stages, 0.01)
    elif implementation == "addmv":
        call = _synchronized(rk_stage.stage_combine_reference, y0, stages, weights, 0.01)
    else:
        call = _synchronized(_inplace_combine, y0, stages, weights, 0.01)
    _gpu_info(benchmark, implementation=implementation, numel=numel)
    call()  # compile outside the timing
    benchmark(call)


@pytest.mark.parametrize("numel", STATE_SIZES)
@pytest.mark.parametrize("implementation", ["triton", "torch"])
def test_error_ratio(benchmark, implementation, numel):
    benchmark.group = f"ratio-float32-N{numel}"
    y0, stages = _stage_inputs(numel, torch.float32)
    y1 = rk_stage.stage_combine_reference(y0, stages, TABLEAU.b, 0.01)
    norm = SegmentNorm.single(numel)
    if implementation == "triton":
        plan = rk_stage.ErrorRatio(TABLEAU.b_error, norm, numel, 1e-5, 1e-5, y0.device)
        call = _synchronized(plan.value, y0, y1, stages, 0.01)
    else:
        weights = torch.tensor(TABLEAU.b_error, dtype=y0.dtype, device=y0.device)
        call = _synchronized(scaled_error_ratio, y0, y1, stages, weights, 0.01, 1e-5, 1e-5, norm)
    _gpu_info(benchmark, implementation=implementation, numel=numel)
    call()  # compile outside the timing
    benchmark(call)


def _cnf_mlp(hidden, batch, requires_grad):
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    widths = (2, hidden, hidden, hidden, 2)
    weights = tuple((torch.randn(widths[k + 1], widths[k] + 1, generator=generator, device=DEVICE)
                     / (widths[k] + 1) ** 0.5).requires_grad_(requires_grad) for k in range(4))
    biases = tuple(torch.zeros(width, device=DEVICE, requires_grad=requires_grad) for width in widths[1:])
    z = torch.randn(batch, 2, generator=generator, device=DEVICE, requires_grad=requires_grad)
    eps = torch.randn(batch, 2, generator=generator, device=DEVICE)
    t = torch.tensor(0.5, device=DEVICE)
    return MLPSpec(weights, biases, "softplus", "all"), t, z, eps


def _vjp_estimator(spec, t, z, eps):
    """What CNF code does without the kernel: f, then an autograd vjp of f with eps."""
    with torch.enable_grad():
        state = z if z.requires_grad else z.detach().requires_grad_()
        f = mlp_reference(spec, t, state)
        (vjp,) = torch.autograd.grad(f, state, eps, create_graph=torch.is_grad_enabled() and z.requires_grad)
    return f, (vjp * eps).sum(dim=1)


HUTCHINSON = {"triton": hutchinson.hutchinson_mlp, "jvp": hutchinson.hutchinson_reference, "vjp": _vjp_estimator}


def _forward_backward(function, spec, t, z, eps):
    f, quad = function(spec, t, z, eps)
    (f.square().sum() - quad.sum()).backward()


@pytest.mark.parametrize("hidden, batch", [(64, 512), (64, 4096), (128, 4096)])
@pytest.mark.parametrize("implementation", list(HUTCHINSON))
@pytest.mark.parametrize("mode", ["forward", "backward"])
def test_hutchinson(benchmark, mode, implementation, hidden, batch):
    benchmark.group = f"hutchinson-{mode}-H{hidden}-B{batch}"
    spec, t, z, eps = _cnf_mlp(hidden, batch, requires_grad=mode == "backward")
    function = HUTCHINSON[implementation]
    if mode == "forward":
        call = _synchronized(torch.no_grad()(function), spec, t, z, eps)
    else:
        call = _synchronized(_forward_backward, function, spec, t, z, eps)
    _gpu_info(benchmark, implementation=implementation, hidden=hidden, batch=batch, mode=mode)
    call()  # compile outside the timing
    benchmark(call)
