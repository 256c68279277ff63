"""Backpropagation through odeint (discretise-then-optimise): gradients with respect to y0, the
parameters of func and the times t, checked with torch.autograd.gradcheck in float64 and against
torchdiffeq's backpropagation."""

import warnings

import pytest
import torch
import torchdiffeq

import fastcnf

F64 = torch.float64


def weight_and_state(seed=0, dim=3, dtype=F64):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(dim, dim, generator=generator, dtype=dtype) * 0.5,
            torch.randn(2, dim, generator=generator, dtype=dtype))


def dynamics_for(weight):
    """A small non-autonomous nonlinear system with parameters ``weight``."""
    return lambda t, y: torch.tanh(y @ weight) * torch.cos(t) - 0.1 * y


CASES = [
    ("dopri5", None, 1e-9),
    ("rk4", dict(step_size=0.25), 0.0),
    ("midpoint", dict(step_size=0.2), 0.0),
    ("euler", dict(step_size=0.1, interp="cubic"), 0.0),
    ("implicit_adams", dict(step_size=0.25, max_iters=20), 1e-12),
]
CASE_IDS = [case[0] + ("-cubic" if case[1] and "interp" in case[1] else "") for case in CASES]


@pytest.mark.parametrize("method, options, tol", CASES, ids=CASE_IDS)
def test_gradcheck_in_y0_parameters_and_t(method, options, tol):
    """Output times between grid points (fixed grids) and inside adaptive steps, so the
    interpolants are differentiated too. The last time is not on the step_size grid: there the
    discrete solution has a kink in t[-1] (one more, tiny, step appears just after it), in
    torchdiffeq as well. dopri5's steps stay the same under gradcheck's perturbations at this
    tolerance; low-order adaptive methods take so many steps that some change, so they are
    checked against torchdiffeq below instead."""
    weight, y0 = weight_and_state()
    t = torch.tensor([0.0, 0.7, 1.63], dtype=F64)

    def solve(y0, weight, t):
        return fastcnf.odeint(dynamics_for(weight), y0, t, method=method, options=options, rtol=tol, atol=tol)

    inputs = (y0.requires_grad_(), weight.requires_grad_(), t.requires_grad_())
    assert torch.autograd.gradcheck(solve, inputs, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("method, options", [("dopri5", None), ("rk4", dict(step_size=0.1))])
def test_gradcheck_in_reverse_time(method, options):
    weight, y0 = weight_and_state(seed=1)
    t = torch.tensor([1.0, 0.43, -0.57], dtype=F64)  # no output time on a grid point (a kink)

    def solve(y0, weight, t):
        return fastcnf.odeint(dynamics_for(weight), y0, t, method=method, options=options, rtol=1e-9, atol=1e-9)

    assert torch.autograd.gradcheck(solve, (y0.requires_grad_(), weight.requires_grad_(), t.requires_grad_()),
                                    atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("method, options", [("dopri5", None), ("rk4", dict(step_size=0.2))])
def test_gradcheck_tuple_state(method, options):
    generator = torch.Generator().manual_seed(2)
    scale = torch.randn(3, generator=generator, dtype=F64)

    def solve(position, velocity, scale, t):
        def func(t, state):
            x, v = state
            return v * torch.cos(t), -scale * torch.sin(x)

        out = fastcnf.odeint(func, (position, velocity), t, method=method, options=options, rtol=1e-9, atol=1e-9)
        return out[0] + 2 * out[1]

    inputs = (torch.randn(3, generator=generator, dtype=F64).requires_grad_(),
              torch.randn(3, generator=generator, dtype=F64).requires_grad_(), scale.requires_grad_(),
              torch.tensor([0.0, 0.5, 1.2], dtype=F64, requires_grad=True))
    assert torch.autograd.gradcheck(solve, inputs, atol=1e-6, rtol=1e-4)


def gradients(interface, method, options, dtype, t_values, rtol, atol, seed=3):
    weight, y0 = weight_and_state(seed=seed, dtype=dtype)
    weight.requires_grad_()
    y0.requires_grad_()
    t = torch.tensor(t_values, dtype=dtype, requires_grad=True)
    out = interface.odeint(dynamics_for(weight), y0, t, method=method, options=options, rtol=rtol, atol=atol)
    loss = (out ** 2).sum() + out[-1].sin().sum()
    return [out.detach(), *torch.autograd.grad(loss, (y0, weight, t))]


ADAPTIVE = ["dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun"]
FIXED_CASES = [("euler", dict(step_size=0.1)), ("midpoint", dict(step_size=0.1)), ("heun3", dict(step_size=0.1)),
               ("rk4", dict(step_size=0.1, interp="cubic")), ("explicit_adams", dict(step_size=0.1, max_order=5)),
               ("implicit_adams", dict(step_size=0.1))]
T_VALUES = [0.0, 0.35, 1.0, 1.83]


def relative_differences(ours, theirs):
    """Largest |a - b| / max|b| for the solution and the gradients in y0, weight and t."""
    return [float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, theirs)]


@pytest.mark.parametrize("method", ADAPTIVE)
def test_adaptive_gradients_match_torchdiffeq(method):
    """float64, with first_step given: the same steps, so the same gradients to rounding."""
    options = dict(first_step=0.05)
    rtol, atol = (1e-5, 1e-7) if method in ("fehlberg2", "adaptive_heun") else (1e-7, 1e-9)
    ours = gradients(fastcnf, method, options, F64, T_VALUES, rtol, atol)
    theirs = gradients(torchdiffeq, method, options, F64, T_VALUES, rtol, atol)
    assert max(relative_differences(ours, theirs)) < 1e-9


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_automatic_first_step_is_not_differentiated(method):
    """Intentional difference: torchdiffeq computes the automatic first step size with autograd
    on, so its gradients include d(first step)/d(y0, params) (step sizes chosen later are under
    no_grad); fastcnf treats every step size as a constant. The solutions are the same and the
    gradients differ by about the solver tolerance (bosh3: 3e-7 relative at rtol=1e-7)."""
    ours = gradients(fastcnf, method, None, F64, T_VALUES, 1e-7, 1e-9)
    theirs = gradients(torchdiffeq, method, None, F64, T_VALUES, 1e-7, 1e-9)
    solution, grad_y0, grad_weight, grad_t = relative_differences(ours, theirs)
    assert solution < 1e-12
    assert max(grad_y0, grad_weight, grad_t) < 1e-5


@pytest.mark.parametrize("method, options", FIXED_CASES, ids=[case[0] for case in FIXED_CASES])
def test_fixed_grid_gradients_match_torchdiffeq(method, options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # implicit Adams corrector warnings, raised by both
        ours = gradients(fastcnf, method, options, F64, T_VALUES, 1e-7, 1e-9)
        theirs = gradients(torchdiffeq, method, options, F64, T_VALUES, 1e-7, 1e-9)
    assert max(relative_differences(ours, theirs)) < 1e-10


@pytest.mark.parametrize("method, options", [(m, None) for m in ADAPTIVE] + FIXED_CASES,
                         ids=ADAPTIVE + [case[0] for case in FIXED_CASES])
def test_float32_gradients_match_torchdiffeq(method, options):
    """float32: rounding differences move adaptive steps a little; the t-gradient, a sum over
    every step, is the most sensitive (adaptive_heun: 6e-3 relative)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = gradients(fastcnf, method, options, torch.float32, T_VALUES, 1e-5, 1e-7)
        theirs = gradients(torchdiffeq, method, options, torch.float32, T_VALUES, 1e-5, 1e-7)
    solution, grad_y0, grad_weight, grad_t = relative_differences(ours, theirs)
    bound = 1e-3 if method == "dopri8" else 1e-4  # dopri8: see test_agreement_torchdiffeq.py
    assert max(solution, grad_y0, grad_weight) < bound
    assert grad_t < 2e-2


def test_gradient_with_tuple_tolerances_and_reverse_time_matches_torchdiffeq():
    results = []
    for interface in (fastcnf, torchdiffeq):
        x0 = torch.tensor([0.3, -0.2], dtype=F64, requires_grad=True)
        v0 = torch.tensor([1.0], dtype=F64, requires_grad=True)
        out = interface.odeint(lambda t, s: (s[1] * torch.ones_like(s[0]), -s[0].sum(0, keepdim=True) * t), (x0, v0),
                               torch.tensor([2.0, 1.0, 0.0], dtype=F64), rtol=(1e-8, 1e-5), atol=(1e-10, 1e-7))
        results.append(torch.autograd.grad(out[0].sum() + out[1].sum(), (x0, v0)))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("method, options, kwargs", [
    ("dopri5", None, dict(rtol=(1e-6, 1e-4), atol=(1e-8, 1e-6))),
    ("dopri5", None, dict()),
    ("rk4", dict(step_size=0.1), dict()),
    ("explicit_adams", dict(step_size=0.1), dict()),
])
def test_backprop_emits_no_warnings(method, options, kwargs):
    """Solves under autograd (tensor tolerances, differentiable t, step callbacks) must not warn,
    e.g. about converting tensors that require grad to Python numbers; torchdiffeq does not."""
    class Func(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor([0.5, -0.3], dtype=F64))

        def forward(self, t, state):
            return state[1] * self.scale, -state[0] * torch.cos(t)

        def callback_step(self, t0, y0, dt):
            self.last_step = (float(t0), float(dt))

    func = Func()
    y0 = (torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True), torch.tensor([0.5, 0.1], dtype=F64))
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64, requires_grad=True)
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch issues some warnings once per process; see every one here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = fastcnf.odeint(func, y0, t, method=method, options=options, **kwargs)
            (out[0].sum() + out[1].sum()).backward()
    finally:
        torch.set_warn_always(warn_always)
    assert func.scale.grad is not None and t.grad is not None


def test_no_graph_is_built_without_grad():
    weight, y0 = weight_and_state()
    with torch.no_grad():
        out = fastcnf.odeint(dynamics_for(weight.requires_grad_()), y0.requires_grad_(),
                             torch.tensor([0.0, 1.0], dtype=F64))
    assert not out.requires_grad


def test_gradient_of_the_final_state_of_a_linear_system():
    """y' = a y: dy(T)/da = T y0 e^{aT} and dy(T)/dT = a y(T), to solver accuracy."""
    a = torch.tensor(-0.7, dtype=F64, requires_grad=True)
    end = torch.tensor(2.0, dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.5], dtype=F64)
    out = fastcnf.odeint(lambda t, y: a * y, y0, torch.stack([torch.zeros((), dtype=F64), end]), rtol=1e-11,
                         atol=1e-12)
    grad_a, grad_end = torch.autograd.grad(out[-1].sum(), (a, end))
    exact = 1.5 * torch.exp(torch.tensor(-1.4, dtype=F64))
    assert grad_a.item() == pytest.approx(2.0 * exact.item(), rel=1e-8)
    assert grad_end.item() == pytest.approx(-0.7 * exact.item(), rel=1e-8)
