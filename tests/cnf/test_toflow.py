"""TO-FLOW: trainable terminal time, its regularizer and clipping, and coordinate descent."""

import math

import pytest
import torch

import fastcnf
from fastcnf.cnf.toflow import CoordinateDescent, TerminalTime, terminal_times


class LinearContraction(torch.nn.Module):
    """dz/dt = -a z on 1-D data, with d(logp)/dt = -tr(df/dz) = a carried alongside."""

    def __init__(self, rate):
        super().__init__()
        self.rate = rate

    def forward(self, t, state):
        z, logp = state
        return -self.rate * z, torch.full_like(logp, self.rate)


def _nll(func, x, times):
    z, delta = fastcnf.odeint_adjoint(func, (x, torch.zeros_like(x)), times, adjoint_params=())
    log_px = -0.5 * z[-1] ** 2 - 0.5 * math.log(2 * math.pi) - delta[-1]
    return -log_px.mean()


def test_terminal_time_converges_to_the_analytic_optimum():
    """For x ~ N(0, s^2) and dz/dt = -a z, the likelihood is best at T* = log(s) / a."""
    torch.manual_seed(0)
    rate = 0.5
    x = torch.randn(2048, 1, dtype=torch.float64) * 3.0
    optimum = math.log(x.pow(2).mean().sqrt().item()) / rate
    end = TerminalTime(init=1.0, t_max=10.0)
    optimizer = torch.optim.Adam(end.parameters(), lr=0.05)
    func = LinearContraction(rate)
    for _ in range(250):
        optimizer.zero_grad()
        _nll(func, x, end.integration_times()).backward()
        optimizer.step()
        end.clip_()
    assert end().item() == pytest.approx(optimum, abs=2e-3)


def test_regularizer_moves_the_optimum_as_expected():
    """With alpha*T added, the optimum satisfies dNLL/dT + alpha = 0: check by bisection."""
    torch.manual_seed(1)
    rate, alpha = 0.5, 0.2
    x = torch.randn(1024, 1, dtype=torch.float64) * 3.0
    variance = x.pow(2).mean().item()
    # NLL(T) = 0.5 * variance * exp(-2 a T) + a T + const  =>  -a variance exp(-2 a T) + a + alpha = 0
    optimum = -math.log((rate + alpha) / (rate * variance)) / (2 * rate)
    end = TerminalTime(init=1.0, alpha=alpha, regularizer="linear")
    optimizer = torch.optim.Adam(end.parameters(), lr=0.05)
    func = LinearContraction(rate)
    for _ in range(250):
        optimizer.zero_grad()
        (_nll(func, x, end.integration_times()) + end.penalty()).backward()
        optimizer.step()
        end.clip_()
    assert end().item() == pytest.approx(optimum, abs=2e-3)


@pytest.mark.parametrize("parameterization", ["softplus", "exp"])
def test_clipping_projects_onto_the_range(parameterization):
    end = TerminalTime(init=1.0, t_min=0.5, t_max=2.0, parameterization=parameterization)
    with torch.no_grad():
        end.raw.fill_(10.0)
    end.clip_()
    assert end().item() == pytest.approx(2.0, rel=1e-12)
    with torch.no_grad():
        end.raw.fill_(-10.0)
    end.clip_()
    assert end().item() == pytest.approx(0.5, rel=1e-12)


def test_penalty_values_and_gradients():
    for regularizer, expected, slope in (("linear", 0.3 * 1.5, 0.3), ("quadratic", 0.3 * 1.5 ** 2, 0.3 * 2 * 1.5)):
        end = TerminalTime(init=1.5, alpha=0.3, regularizer=regularizer)
        penalty = end.penalty()
        (grad_raw,) = torch.autograd.grad(penalty, end.raw)
        (dt_draw,) = torch.autograd.grad(end(), end.raw)
        assert penalty.item() == pytest.approx(expected, rel=1e-12)
        assert (grad_raw / dt_draw).item() == pytest.approx(slope, rel=1e-12)


def test_integration_times_with_fractions():
    end = TerminalTime(init=2.0)
    times = end.integration_times(t0=0.5, fractions=[0.0, 0.25, 1.0])
    torch.testing.assert_close(times, torch.tensor([0.5, 1.0, 2.5], dtype=torch.float64))
    assert times.requires_grad


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="parameterization"):
        TerminalTime(parameterization="square")
    with pytest.raises(ValueError, match="t_min"):
        TerminalTime(t_min=2.0, t_max=1.0)
    with pytest.raises(ValueError, match="init"):
        TerminalTime(init=20.0, t_max=10.0)
    with pytest.raises(ValueError, match="alpha"):
        TerminalTime(alpha=-1.0)


def test_coordinate_descent_alternates_and_freezes():
    torch.manual_seed(0)
    net = torch.nn.Linear(1, 1).double()
    end = TerminalTime(init=1.0)
    model = torch.nn.ModuleDict({"net": net, "end": end})
    assert terminal_times(model) == [end]
    weights = torch.optim.SGD(net.parameters(), lr=0.1)
    times = torch.optim.SGD(end.parameters(), lr=0.1)
    schedule = CoordinateDescent(weights, times, [end], weight_steps=2, time_steps=1)
    assert [schedule.phase(i) for i in range(6)] == ["weights", "weights", "time"] * 2
    history = []
    for iteration in range(3):
        phase = schedule.begin(iteration)
        assert net.weight.requires_grad == (phase == "weights")
        assert end.raw.requires_grad == (phase == "time")
        before = (net.weight.detach().clone(), end().detach().clone())
        loss = (net(torch.ones(1, 1, dtype=torch.float64)) * end()).sum()
        loss.backward()
        schedule.step()
        history.append((phase, not torch.equal(before[0], net.weight), not torch.equal(before[1], end().detach())))
    assert history == [("weights", True, False), ("weights", True, False), ("time", False, True)]
    joint = CoordinateDescent(weights, times, [end], mode="joint")
    assert joint.begin(0) == "joint" and net.weight.requires_grad and end.raw.requires_grad
