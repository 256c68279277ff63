"""Gradients through implicit steps (implicit function theorem) against finite differences."""

import pytest
import torch

import fastcnf

F64 = torch.float64
TIGHT = dict(nonlinear_rtol=1e-13, nonlinear_atol=1e-13)


def _inputs():
    generator = torch.Generator().manual_seed(0)
    weight = (0.8 * torch.randn(3, 3, generator=generator, dtype=F64)).requires_grad_()
    y0 = torch.randn(2, 3, generator=generator, dtype=F64).requires_grad_()
    end = torch.tensor(0.35, dtype=F64, requires_grad=True)
    return weight, y0, end


def _solve(method, options):
    def run(weight, y0, end):
        def func(t, y):
            return torch.tanh(y @ weight) * torch.cos(t) - 2.0 * y

        t = torch.stack([torch.zeros((), dtype=F64), end])
        return fastcnf.odeint(func, y0, t, method=method, options=dict(step_size=0.1, **TIGHT, **options))[-1]

    return run


@pytest.mark.parametrize("method, options", [
    ("radauIIA5", {}),
    ("radauIIA5", dict(jacobian_structure="block_diagonal")),
    ("gl4", dict(nonlinear_solver="fixed_point")),
    ("trbdf2", {}),
    ("trbdf2", dict(jacobian_structure="block_diagonal", jacobian="jacrev")),
    ("implicit_euler", {}),
])
def test_gradcheck_parameters_initial_state_and_end_time(method, options):
    assert torch.autograd.gradcheck(_solve(method, options), _inputs(), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_gradcheck_on_a_stiff_problem():
    """|lambda| dt = 100: the backward solve needs the Newton preconditioner too."""
    generator = torch.Generator().manual_seed(2)
    rates = torch.tensor([-1.0, -1e3], dtype=F64, requires_grad=True)
    y0 = torch.randn(2, generator=generator, dtype=F64).requires_grad_()

    def run(rates, y0):
        def func(t, y):
            return rates * y + torch.sin(y[[1, 0]]) + t

        return fastcnf.odeint(func, y0, torch.tensor([0.0, 0.5], dtype=F64), method="radauIIA3",
                              options=dict(step_size=0.1, **TIGHT))

    assert torch.autograd.gradcheck(run, (rates, y0), eps=1e-7, atol=1e-7, rtol=1e-6)


def test_linear_problem_gradient_is_the_discrete_propagator():
    """For y' = a y, implicit Euler gives y_n = y0 / (1 - a h)^n; its derivative in a is known."""
    a = torch.tensor(-3.0, dtype=F64, requires_grad=True)
    y0 = torch.tensor([2.0], dtype=F64)
    steps, h = 5, 0.1
    y = fastcnf.odeint(lambda t, y: a * y, y0, torch.tensor([0.0, steps * h], dtype=F64), method="implicit_euler",
                       options=dict(step_size=h))[-1]
    (grad,) = torch.autograd.grad(y.sum(), a)
    expected = y0.item() * steps * h * (1 - a.item() * h) ** (-steps - 1)
    assert float(grad) == pytest.approx(expected, rel=1e-10)


def test_solve_under_grad_mode_without_inputs_needing_grad_returns_a_plain_tensor():
    y = fastcnf.odeint(lambda t, y: -y ** 3, torch.ones(3, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                       method="gl6", options=dict(step_size=0.25))
    assert not y.requires_grad


@pytest.mark.parametrize("method", ["gl4", "trbdf2"])
def test_event_time_gradient(method):
    """y = a cos t + b sin t crosses 0 at t* = pi/2 for (a, b) = (1, 0): dt*/da = 0, dt*/db = 1."""
    y0 = torch.tensor([1.0, 0.0], dtype=F64, requires_grad=True)
    event_t, _ = fastcnf.odeint_event(lambda t, y: torch.stack([y[1], -y[0]]), y0, torch.tensor(0.0, dtype=F64),
                                      event_fn=lambda t, y: y[0], method=method, atol=1e-12,
                                      options=dict(step_size=0.01, interp="cubic"))
    (grad,) = torch.autograd.grad(event_t, y0)
    tolerance = 1e-8 if method == "gl4" else 1e-4
    torch.testing.assert_close(grad, torch.tensor([0.0, 1.0], dtype=F64), rtol=0, atol=tolerance)
