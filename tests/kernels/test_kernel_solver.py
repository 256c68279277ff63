"""Solves with FASTCNF_BACKEND=triton (fused stage and error-ratio kernels) equal FASTCNF_BACKEND=torch."""

import pytest
import torch

pytest.importorskip("triton")

from fastcnf.kernels import rk_stage  # noqa: E402

import fastcnf  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _problem(dtype, device, batch=3):
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(4, 4, generator=generator, dtype=dtype) * 0.5).to(device)
    y0 = torch.randn(batch, 4, generator=generator, dtype=dtype).to(device)

    def func(t, y):
        return torch.tanh(y @ weight) + torch.sin(t)

    return func, y0, torch.linspace(0, 2, 5, dtype=dtype, device=device)


def _solve(monkeypatch, backend, *args, **kwargs):
    monkeypatch.setenv("FASTCNF_BACKEND", backend)
    with fastcnf.track() as stats:
        solution = fastcnf.odeint(*args, **kwargs)
    return solution, (stats.nfe_forward, stats.steps_accepted, stats.steps_rejected)


class _CountedKernel:
    """A Triton kernel whose launches (``kernel[grid](...)``) are counted under ``name``."""

    def __init__(self, kernel, counts, name):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        self.counts[self.name] += 1
        return self.kernel[grid]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts launches of the fused kernels: stage combination, error partials, ratio + decision."""
    counts = {"ratio": 0, "combine": 0, "partials": 0}
    for name, attribute in (("combine", "_stage_combine_kernel"), ("partials", "_error_partials_kernel"),
                            ("ratio", "_error_finalize_kernel")):
        monkeypatch.setattr(rk_stage, attribute, _CountedKernel(getattr(rk_stage, attribute), counts, name))
    return counts


# dopri8's embedded error at rtol=1e-6 is below float32 resolution (its error ratio is rounding
# noise there, and the torch and C++ backends take different steps too), so float32 skips it.
@pytest.mark.parametrize("method, dtype_name", [(method, name) for method in ("dopri5", "tsit5", "bosh3", "dopri8")
                                                for name in ("float32", "float64")
                                                if (method, name) != ("dopri8", "float32")])
def test_adaptive_solve_matches_torch_backend(method, dtype_name, device, monkeypatch, kernel_calls):
    dtype = getattr(torch, dtype_name)
    func, y0, t = _problem(dtype, device)
    expected, expected_stats = _solve(monkeypatch, "torch", func, y0, t, method=method, rtol=1e-6, atol=1e-8)
    assert kernel_calls == {"ratio": 0, "combine": 0, "partials": 0}
    solution, stats = _solve(monkeypatch, "triton", func, y0, t, method=method, rtol=1e-6, atol=1e-8)
    assert stats == expected_stats
    assert kernel_calls["ratio"] == stats[1] + stats[2]  # one fused error ratio + decision per trial step
    assert kernel_calls["partials"] == kernel_calls["ratio"]
    assert kernel_calls["combine"] > kernel_calls["ratio"]
    # dopri8's error estimate is at rounding level: different summation orders move its steps
    tolerance = dict(rtol=1e-7, atol=1e-9) if method == "dopri8" else TOL[dtype]
    torch.testing.assert_close(solution, expected, **tolerance)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_device_loop_runs_the_fused_kernels(method, dtype, device, monkeypatch, kernel_calls):
    """The sync-free device loop (the default on CUDA) combines its stages and judges its steps in the
    fused kernels, reading dt on the device, and gives the torch reference's answer."""
    func, y0, t = _problem(dtype, device)
    expected, expected_stats = _solve(monkeypatch, "torch", func, y0, t, method=method, rtol=1e-6, atol=1e-8)
    with torch.no_grad():
        solution, stats = _solve(monkeypatch, "triton", func, y0, t, method=method, rtol=1e-6, atol=1e-8,
                                 options=dict(device_loop=True))
    trials = stats[1] + stats[2]
    stages = len(fastcnf.ode.explicit.tableaus.ADAPTIVE_TABLEAUS[method].c)
    assert kernel_calls["ratio"] >= trials and kernel_calls["partials"] == kernel_calls["ratio"]
    assert kernel_calls["combine"] >= (stages - 1) * kernel_calls["ratio"]
    assert abs(stats[1] - expected_stats[1]) + abs(stats[2] - expected_stats[2]) <= (dtype == torch.float32)
    torch.testing.assert_close(solution, expected, **(TOL[dtype] if stats[1:] == expected_stats[1:] else
                                                      dict(rtol=1e-4, atol=1e-5)))


def test_device_loop_under_autograd_uses_the_stage_kernel(device, monkeypatch, kernel_calls):
    func, y0, t = _problem(torch.float64, device)
    grads = []
    for backend, options in (("torch", None), ("triton", dict(device_loop=True))):
        monkeypatch.setenv("FASTCNF_BACKEND", backend)
        start = y0.clone().requires_grad_()
        solution = fastcnf.odeint(func, start, t, method="dopri5", rtol=1e-7, atol=1e-9, options=options)
        grads.append(torch.autograd.grad(solution.square().sum(), start)[0])
    assert kernel_calls["combine"] > 0 and kernel_calls["ratio"] > 0
    torch.testing.assert_close(grads[1], grads[0], **TOL[torch.float64])


def test_tuple_state_with_per_entry_tolerances(device, monkeypatch, kernel_calls):
    """Tuple states use one norm segment per entry and an (N,) tolerance vector."""
    func, y0, t = _problem(torch.float64, device, batch=250)
    velocity = torch.linspace(-1, 1, 7, dtype=torch.float64, device=device)

    def tuple_func(t, state):
        return func(t, state[0]), -state[1] * state[0].mean()

    args = (tuple_func, (y0, velocity), t)
    kwargs = dict(method="dopri5", rtol=(1e-6, 1e-4), atol=(1e-8, 1e-6))
    expected, expected_stats = _solve(monkeypatch, "torch", *args, **kwargs)
    solution, stats = _solve(monkeypatch, "triton", *args, **kwargs)
    assert stats == expected_stats and kernel_calls["ratio"] > 0
    for part, expected_part in zip(solution, expected):
        torch.testing.assert_close(part, expected_part, **TOL[torch.float64])


def test_gradients_through_the_solver_match(device, monkeypatch, kernel_calls):
    """Under autograd the stage kernel runs through its autograd.Function."""
    func, y0, t = _problem(torch.float64, device)
    grads = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FASTCNF_BACKEND", backend)
        start = y0.clone().requires_grad_()
        solution = fastcnf.odeint(func, start, t, method="dopri5", rtol=1e-7, atol=1e-9)
        grads.append(torch.autograd.grad(solution.square().sum(), start)[0])
    assert kernel_calls["combine"] > 0
    torch.testing.assert_close(grads[1], grads[0], **TOL[torch.float64])


def test_fixed_grid_matches_torch_backend(device, monkeypatch, kernel_calls):
    func, y0, t = _problem(torch.float32, device)
    expected, _ = _solve(monkeypatch, "torch", func, y0, t, method="rk4", options=dict(step_size=0.1))
    solution, _ = _solve(monkeypatch, "triton", func, y0, t, method="rk4", options=dict(step_size=0.1))
    assert kernel_calls["combine"] == 20 * 4  # three stage inputs and the solution per step
    torch.testing.assert_close(solution, expected, **TOL[torch.float32])


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    func, y0, t = _problem(torch.float64, "cpu")
    monkeypatch.setenv("FASTCNF_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fastcnf.odeint(func, y0, t, method="dopri5")


@pytest.mark.parametrize("device_loop", [False, True])
def test_pi_controller_decides_like_the_reference(device, monkeypatch, kernel_calls, device_loop):
    """options=dict(controller="pi"): the Triton decision (carrying the last accepted error ratio on the
    device in the device loop) takes the torch reference's steps."""
    func, y0, t = _problem(torch.float64, device)
    kwargs = dict(method="dopri5", rtol=1e-7, atol=1e-9, options=dict(controller="pi", pcoeff=0.3, icoeff=0.4))
    expected, expected_stats = _solve(monkeypatch, "torch", func, y0, t, **kwargs)
    integral, integral_stats = _solve(monkeypatch, "torch", func, y0, t, method="dopri5", rtol=1e-7, atol=1e-9)
    assert integral_stats != expected_stats  # the PI rule takes other steps
    with torch.no_grad():
        solution, stats = _solve(monkeypatch, "triton", func, y0, t, **dict(
            kwargs, options=dict(kwargs["options"], device_loop=device_loop)))
    assert stats == expected_stats and kernel_calls["ratio"] >= stats[1] + stats[2]
    torch.testing.assert_close(solution, expected, **TOL[torch.float64])
