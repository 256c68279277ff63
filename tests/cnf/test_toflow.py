"""TO-FLOW: trainable terminal time, its regularizer and clipping, its optimizer and coordinate descent.

The analytic case: 1-D data x ~ N(m, s^2) and dz/dt = -a (z - b) with a fixed and the centre b a
trainable weight. Then z(T) = b + (x - b) e^{-aT}, log p(x) = log N(z(T)) - aT, and with b at its
optimum (mean of z(T) zero)

    NLL(T) = 1/2 v e^{-2aT} + aT + const,   v = the data's (biased) variance,

so dNLL/dT = a - a v e^{-2aT}: unregularized T* = log(v) / (2a); with alpha*T the stationary T solves
a v e^{-2aT} = a + alpha, with alpha*T^2 it solves a v e^{-2aT} = a + 2 alpha T.
"""

import math

import pytest
import torch
from scipy.optimize import brentq

import fastcnf
from fastcnf.cnf import CNF, SolverSettings
from fastcnf.cnf.toflow import CoordinateDescent, TerminalTime, terminal_times, time_optimizer

RATE = 0.5


class Contraction(torch.nn.Module):
    """dz/dt = -a (z - b) with d(logp)/dt = -tr(df/dz) = a carried alongside; a fixed, b a trainable centre."""

    def __init__(self, rate=RATE):
        super().__init__()
        self.rate = rate
        self.centre = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, t, state):
        z, logp = state
        return -self.rate * (z - self.centre), torch.full_like(logp, self.rate)


def _nll(func, x, times):
    """The flow's negative log-likelihood; dL/dT comes from the adjoint pass."""
    z, delta_logp = fastcnf.odeint_adjoint(func, (x, torch.zeros_like(x)), times, rtol=1e-6, atol=1e-6)
    return -(-0.5 * z[-1] ** 2 - 0.5 * math.log(2 * math.pi) - delta_logp[-1]).mean()


def _data(seed=0, num=256, mean=1.5, scale=3.0):
    x = torch.randn(num, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale + mean
    return x, x.var(unbiased=False).item()


def _stationary_time(variance, alpha=0.0, regularizer="linear"):
    """The T where dNLL/dT + R'(T) = 0 (see the module docstring)."""
    slope = (lambda t: alpha) if regularizer == "linear" else (lambda t: 2 * alpha * t)
    return brentq(lambda t: RATE - RATE * variance * math.exp(-2 * RATE * t) + slope(t), 1e-6, 50.0)


def _train(alpha=0.0, regularizer="linear", schedule="joint", weight_steps=1, time_steps=1, iterations=175):
    """Coordinate descent on (b, T) from b = 0, T = 1; returns (T, b, data variance, phases seen)."""
    x, variance = _data()
    net = Contraction()
    end = TerminalTime(init=1.0, t_min=0.1, t_max=5.0, regularizer=regularizer, alpha=alpha)
    schedule = CoordinateDescent(torch.optim.Adam(net.parameters(), lr=0.1), time_optimizer([end], lr=0.05),
                                 [end], weight_steps, time_steps, schedule)
    phases = set()
    for iteration in range(iterations):
        phases.add(schedule.begin(iteration))
        loss = _nll(net, x, end.integration_times()) + end.penalty()
        loss.backward()
        schedule.step()
    return end().item(), net.centre.item(), variance, phases


@pytest.mark.parametrize("schedule, weight_steps, time_steps", [
    ("joint", 1, 1), pytest.param("joint", 2, 1, marks=pytest.mark.slow), ("alternate", 1, 1)])
def test_coordinate_descent_converges_to_the_analytic_optimum(schedule, weight_steps, time_steps):
    end, centre, variance, phases = _train(schedule=schedule, weight_steps=weight_steps, time_steps=time_steps,
                                           iterations=175 * (weight_steps + time_steps))
    assert end == pytest.approx(math.log(variance) / (2 * RATE), abs=2e-3)  # log(std) / a
    decay = math.exp(-RATE * end)
    x, _ = _data()
    assert centre == pytest.approx(-x.mean().item() * decay / (1 - decay), abs=2e-3)  # mean of z(T) is 0
    expected = {"joint": {"joint"} if weight_steps == 1 else {"joint", "weights"}, "alternate": {"weights", "time"}}
    assert phases == expected[schedule]


@pytest.mark.parametrize("alpha, regularizer", [(0.1, "linear"), pytest.param(0.3, "linear", marks=pytest.mark.slow),
                                                (0.1, "quadratic")])
def test_alpha_moves_the_stationary_time_as_the_formula_says(alpha, regularizer):
    end, _, variance, _ = _train(alpha=alpha, regularizer=regularizer)
    expected = _stationary_time(variance, alpha, regularizer)
    assert expected < _stationary_time(variance) - 0.1  # the regularizer matters at this alpha
    assert end == pytest.approx(expected, abs=2e-3)


@pytest.mark.parametrize("alpha_small, alpha_large", [(0.01, 0.1)])
def test_sgd_moves_t_in_proportion_to_alpha_where_adam_does_not(alpha_small, alpha_large):
    """Where the likelihood is flat in T (weights that have adapted to it), only the penalty acts:
    SGD moves T by lr * alpha per step, so alpha scales the drift; Adam moves it by about lr whatever
    alpha is, which is why T is not stepped by Adam (``fastcnf.cnf.toflow``)."""

    def drift(alpha, make_optimizer, steps=50):
        end = TerminalTime(init=1.0, alpha=alpha)
        optimizer = make_optimizer(end)
        for _ in range(steps):
            optimizer.zero_grad()
            end.penalty().backward()
            optimizer.step()
            end.clip_()
        return 1.0 - end().item()

    sgd = [drift(alpha, lambda end: time_optimizer([end], lr=1e-3, momentum=0.0)) for alpha in
           (alpha_small, alpha_large)]
    adam = [drift(alpha, lambda end: torch.optim.Adam(end.parameters(), lr=1e-3)) for alpha in
            (alpha_small, alpha_large)]
    assert sgd == pytest.approx([50 * 1e-3 * alpha_small, 50 * 1e-3 * alpha_large], rel=1e-9)
    assert adam == pytest.approx([50 * 1e-3] * 2, rel=1e-6)
    momentum = drift(alpha_small, lambda end: time_optimizer([end], lr=1e-3, momentum=0.9))
    expected = 1e-3 * alpha_small * sum((1 - 0.9 ** k) / (1 - 0.9) for k in range(1, 51))
    assert momentum == pytest.approx(expected, rel=1e-9)


def test_cnf_block_time_gradient_in_the_analytic_case():
    """A CNF block (exact divergence) with b = 0: NLL = 1/2 E[x^2] e^{-2aT} + aT + const, so the
    adjoint's dNLL/dT must be a - a E[x^2] e^{-2aT}."""

    class Field(torch.nn.Module):
        def forward(self, t, z):
            return -RATE * z

    x, _ = _data(mean=0.0)
    end = TerminalTime(init=0.7)
    flow = CNF(Field(), end_time=end, divergence="exact", train_solver=SolverSettings("dopri5", 1e-8, 1e-8))
    (-flow.log_prob(x).mean()).backward()
    shrunk_moment = x.pow(2).mean().item() * math.exp(-2 * RATE * 0.7)
    assert end.value.grad.item() == pytest.approx(RATE - RATE * shrunk_moment, rel=1e-6)


def test_clipping_projects_onto_the_range():
    end = TerminalTime(init=1.0, t_min=0.5, t_max=2.0)
    with torch.no_grad():
        end.value.fill_(10.0)
    end.clip_()
    assert end().item() == 2.0
    with torch.no_grad():
        end.value.fill_(-10.0)
    end.clip_()
    assert end().item() == 0.5
    assert (TerminalTime().t_min, TerminalTime().t_max, TerminalTime().value.item()) == (0.1, 1.9, 1.0)


def test_penalty_values_and_gradients():
    for regularizer, expected, slope in (("linear", 0.3 * 1.5, 0.3), ("quadratic", 0.3 * 1.5 ** 2, 0.3 * 2 * 1.5)):
        end = TerminalTime(init=1.5, alpha=0.3, regularizer=regularizer)
        penalty = end.penalty()
        (grad,) = torch.autograd.grad(penalty, end.value)
        assert penalty.item() == pytest.approx(expected, rel=1e-12)
        assert grad.item() == pytest.approx(slope, rel=1e-12)


def test_integration_times_with_fractions():
    end = TerminalTime(init=1.5)
    times = end.integration_times(t0=0.5, fractions=[0.0, 0.25, 1.0])
    torch.testing.assert_close(times, torch.tensor([0.5, 0.875, 2.0], dtype=torch.float64))
    assert times.requires_grad
    torch.testing.assert_close(end.integration_times(), torch.tensor([0.0, 1.5], dtype=torch.float64))


def test_works_with_plain_odeint_adjoint():
    """The README's pattern: a TerminalTime's times passed straight to fastcnf.odeint_adjoint."""
    end = TerminalTime(init=0.9)
    y0 = torch.tensor([2.0], dtype=torch.float64)
    solution = fastcnf.odeint_adjoint(lambda t, y: -y, y0, end.integration_times(), rtol=1e-10, atol=1e-10,
                                      adjoint_params=())
    solution[-1].sum().backward()
    assert end.value.grad.item() == pytest.approx(-2.0 * math.exp(-0.9), rel=1e-7)  # d/dT 2 e^{-T}


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="regularizer"):
        TerminalTime(regularizer="cubic")
    with pytest.raises(ValueError, match="t_min"):
        TerminalTime(t_min=2.0, t_max=1.0)
    with pytest.raises(ValueError, match="init"):
        TerminalTime(init=2.5)
    with pytest.raises(ValueError, match="alpha"):
        TerminalTime(alpha=-1.0)
    with pytest.raises(ValueError, match="time lr"):
        time_optimizer([TerminalTime()], lr=0.0)
    with pytest.raises(ValueError, match="momentum"):
        time_optimizer([TerminalTime()], momentum=1.0)
    end = TerminalTime()
    optimizers = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), time_optimizer([end]))
    with pytest.raises(ValueError, match="schedule"):
        CoordinateDescent(*optimizers, [end], schedule="random")
    with pytest.raises(ValueError, match="cannot exceed weight_steps"):
        CoordinateDescent(*optimizers, [end], weight_steps=1, time_steps=2)
    with pytest.raises(RuntimeError, match="begin"):
        CoordinateDescent(*optimizers, [end]).step()


def test_phases_freeze_what_they_do_not_update():
    torch.manual_seed(0)
    net = torch.nn.Linear(1, 1).double()
    end = TerminalTime(init=1.0)
    model = torch.nn.ModuleDict({"net": net, "end": end, "again": end})
    assert terminal_times(model) == [end]
    weights = torch.optim.SGD(net.parameters(), lr=0.1)
    times = time_optimizer([end], lr=0.1)
    alternate = CoordinateDescent(weights, times, [end], weight_steps=2, time_steps=1, schedule="alternate")
    assert [alternate.phase(i) for i in range(6)] == ["weights", "weights", "time"] * 2
    joint = CoordinateDescent(weights, times, [end], weight_steps=3, time_steps=1)
    assert [joint.phase(i) for i in range(6)] == ["weights", "weights", "joint"] * 2
    assert [CoordinateDescent(weights, times, [end]).phase(i) for i in range(2)] == ["joint"] * 2
    history = []
    for schedule in (alternate, joint):
        for iteration in range(3):
            phase = schedule.begin(iteration)
            assert net.weight.requires_grad == (phase != "time")
            assert end.value.requires_grad == (phase != "weights")
            before = (net.weight.detach().clone(), end().detach().clone())
            loss = (net(torch.ones(1, 1, dtype=torch.float64)) * end()).sum()
            loss.backward()
            schedule.step()
            history.append((phase, not torch.equal(before[0], net.weight), not torch.equal(before[1], end().detach())))
    assert history == [("weights", True, False), ("weights", True, False), ("time", False, True),
                       ("weights", True, False), ("weights", True, False), ("joint", True, True)]
