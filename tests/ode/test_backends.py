"""Backend choice (fastcnf/ode/backend.py): FASTCNF_BACKEND=torch (pure-torch reference) and cpp (the
C++ controller and fused stage combiner) give the same solutions; the variable is read when a
solver is built."""

import warnings

import pytest
import torch
from problems import CountingFunc, tanh_problem

import fastcnf
from fastcnf.ode.backend import HAS_EXT, select_backend
from fastcnf.ode.control import ReferenceController
from fastcnf.ode.explicit.stepper import FUSED_MAX_NUMEL
from fastcnf.ode.problem import prepare

needs_ext = pytest.mark.skipif(not HAS_EXT, reason="the C++ extension fastcnf._C is not built")

F64 = torch.float64
ADAPTIVE = ["dopri8", "dopri5", "tsit5", "bosh3", "fehlberg2", "adaptive_heun"]
FIXED = [("euler", dict(step_size=0.1)), ("midpoint", dict(step_size=0.1)), ("heun3", dict(step_size=0.1)),
         ("rk4", dict(step_size=0.1)), ("explicit_adams", dict(step_size=0.1)), ("implicit_adams", dict(step_size=0.1))]


def built_solver(method="dopri5", y0=None, **kwargs):
    y0 = torch.ones(3, dtype=F64) if y0 is None else y0
    problem = prepare(lambda t, y: -y, y0, torch.tensor([0.0, 1.0], dtype=F64), kwargs.get("rtol", 1e-6),
                      kwargs.get("atol", 1e-8), method, None, None)
    return problem.build_solver()


@needs_ext
def test_backend_is_read_when_the_solver_is_built(monkeypatch):
    monkeypatch.setenv("FASTCNF_BACKEND", "torch")
    torch_solver = built_solver()
    monkeypatch.setenv("FASTCNF_BACKEND", "cpp")
    cpp_solver = built_solver()
    monkeypatch.delenv("FASTCNF_BACKEND")
    auto_solver = built_solver()
    assert isinstance(torch_solver.controller, ReferenceController)
    assert not isinstance(cpp_solver.controller, ReferenceController)
    assert type(auto_solver.controller) is type(cpp_solver.controller)
    assert select_backend(torch.device("cpu")) == "cpp"


@needs_ext
def test_tensor_tolerances_use_the_python_controller_under_cpp(monkeypatch):
    """The fused controller takes scalar tolerances; per-element ones fall back to the reference."""
    monkeypatch.setenv("FASTCNF_BACKEND", "cpp")
    solver = built_solver(rtol=torch.full((3,), 1e-6, dtype=F64))
    assert isinstance(solver.controller, ReferenceController)


def solve_with_backend(monkeypatch, backend, method, dtype, options=None, state="tensor", grad=False):
    monkeypatch.setenv("FASTCNF_BACKEND", backend)
    func, y0 = tanh_problem(dtype)
    if state == "tuple":
        flat_func = func

        def func(t, parts):
            out = flat_func(t, torch.cat(parts))
            return out[:1], out[1:]

        y0 = (y0[:1], y0[1:])
    counting = CountingFunc(func)
    rtol, atol = (1e-4, 1e-6) if dtype == torch.float32 else (1e-7, 1e-9)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # implicit Adams corrector warnings
        out = fastcnf.odeint(counting, y0, torch.linspace(0, 2, 5, dtype=dtype), method=method, options=options,
                             rtol=rtol, atol=atol)
    return (torch.cat([o.reshape(5, -1) for o in out], 1) if state == "tuple" else out), counting.calls


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("state", ["tensor", "tuple"])
@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_solutions_agree_across_backends(monkeypatch, method, state, dtype):
    """float64: the same steps and values to rounding. float32: the C++ error ratio accumulates in
    double, so a decision near the threshold may differ (the first step's error ratio is rounding
    noise, and the step after it grows by up to ifactor from it): the evaluation counts differ by at
    most one trial step or 10%, and solutions agree to the tolerance."""
    reference, reference_calls = solve_with_backend(monkeypatch, "torch", method, dtype, state=state)
    fused, fused_calls = solve_with_backend(monkeypatch, "cpp", method, dtype, state=state)
    if dtype == F64:
        assert fused_calls == reference_calls
        torch.testing.assert_close(fused, reference, rtol=1e-10, atol=1e-10)
    else:
        trial_step = fastcnf.METHODS[method].fixed["tableau"].stages
        assert abs(fused_calls - reference_calls) <= max(0.1 * reference_calls, trial_step)
        torch.testing.assert_close(fused, reference, rtol=1e-3, atol=1e-4)


@needs_ext
@pytest.mark.parametrize("method", ADAPTIVE)
def test_pi_controller_takes_the_same_steps_on_every_backend(monkeypatch, method):
    """options=dict(controller="pi"): the C++ rule (carrying the last accepted error ratio through the
    loop) takes the reference's steps, and they differ from the integral controller's."""
    options = dict(controller="pi")
    reference, reference_calls = solve_with_backend(monkeypatch, "torch", method, F64, options)
    fused, fused_calls = solve_with_backend(monkeypatch, "cpp", method, F64, options)
    _, integral_calls = solve_with_backend(monkeypatch, "cpp", method, F64)
    assert fused_calls == reference_calls != integral_calls
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-10)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("method, options", FIXED, ids=[case[0] for case in FIXED])
def test_fixed_grid_solutions_agree_across_backends(monkeypatch, method, options, dtype):
    reference, reference_calls = solve_with_backend(monkeypatch, "torch", method, dtype, options)
    fused, fused_calls = solve_with_backend(monkeypatch, "cpp", method, dtype, options)
    assert fused_calls == reference_calls
    tolerance = 1e-5 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(fused, reference, rtol=0, atol=tolerance)


@pytest.mark.parametrize("method, options", [("dopri5", None), ("rk4", dict(step_size=0.1))])
def test_autograd_path_equals_the_buffered_path(monkeypatch, method, options):
    """Under autograd the stages are fresh tensors combined by addmv; without, reused buffers and
    the fused combiner (or in-place adds). Same numbers."""
    without_grad, calls = solve_with_backend(monkeypatch, "cpp" if HAS_EXT else "torch", method, F64, options)
    with_grad, grad_calls = solve_with_backend(monkeypatch, "cpp" if HAS_EXT else "torch", method, F64, options,
                                               grad=True)
    assert calls == grad_calls
    torch.testing.assert_close(with_grad, without_grad, rtol=0, atol=1e-12)


@needs_ext
@pytest.mark.parametrize("method, options", [("dopri5", None), ("rk4", dict(step_size=0.25))])
def test_large_states_agree_across_backends(monkeypatch, method, options):
    """Above FUSED_MAX_NUMEL elements the C++ path combines stages with in-place adds."""
    generator = torch.Generator().manual_seed(0)
    y0 = torch.randn(FUSED_MAX_NUMEL + 3, dtype=F64, generator=generator)
    scale = torch.rand(FUSED_MAX_NUMEL + 3, dtype=F64, generator=generator)
    results = []
    for backend in ("torch", "cpp") if HAS_EXT else ("torch",):
        monkeypatch.setenv("FASTCNF_BACKEND", backend)
        results.append(fastcnf.odeint(lambda t, y: -scale * y + torch.sin(t), y0, torch.tensor([0.0, 1.0], dtype=F64),
                                      method=method, options=options, rtol=1e-7, atol=1e-9))
    torch.testing.assert_close(results[-1], results[0], rtol=0, atol=1e-12)


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("FASTCNF_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTCNF_BACKEND='cuda' is not one of auto, torch, cpp, triton"):
        fastcnf.odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]))


def test_triton_backend_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("FASTCNF_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton"):
        select_backend(torch.device("cpu"))
