"""Stiffness detection (fastcnf/ode/explicit/stiffness.py): the h|lambda| estimate from two stages at one
node, the stability boundaries, stiff problems stopped or reported promptly, no extra evaluations,
and no false alarms (pyproject.toml also turns a StiffnessWarning anywhere in the suite into an error)."""

import math
import time
import warnings

import pytest
import torch
from problems import decay_sine, kepler, linear, tanh_problem

import fastcnf
from fastcnf.ode.explicit.stiffness import StiffnessCheck, stability_boundary, stage_pair
from fastcnf.ode.explicit.tableaus import ADAPTIVE_TABLEAUS

F64 = torch.float64
CHECKED = ["dopri5", "tsit5", "dopri8"]
UNCHECKED = ["bosh3", "fehlberg2", "adaptive_heun"]


def stiff_forcing(t, y):
    """y' = -1e6 (y - cos t): the issue's problem (dopri5 at rtol = atol = 1e-10 ran for minutes)."""
    return -1e6 * (y - torch.cos(t))


def van_der_pol(mu):
    def func(t, y):
        return torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])

    return func


@pytest.mark.parametrize("method", CHECKED)
def test_the_estimate_is_h_lambda_on_a_linear_problem(method):
    """For f = lambda y the stage difference is exactly lambda times the input difference."""
    tableau = ADAPTIVE_TABLEAUS[method]
    check = StiffnessCheck(tableau)
    steps = []

    class Recorder(torch.nn.Module):
        def forward(self, t, y):
            return -50.0 * y

        def callback_accept_step(self, t, y, dt):
            steps.append(float(dt))

    solver_stages = []
    original = StiffnessCheck.observe
    try:
        StiffnessCheck.observe = lambda self, stages, t, dt: solver_stages.append(stages.clone())
        fastcnf.odeint(Recorder(), torch.ones(3, dtype=F64), torch.tensor([0.0, 0.05], dtype=F64), method=method,
                       rtol=1e-6, atol=1e-9)
    finally:
        StiffnessCheck.observe = original
    for stages, dt in zip(solver_stages, steps):
        assert check.estimate(stages) == pytest.approx(50.0 * dt, rel=1e-9)


@pytest.mark.parametrize("method, boundary", [("dopri5", 3.306), ("tsit5", 3.506), ("dopri8", 5.166),
                                              ("bosh3", 2.512), ("fehlberg2", 2.007), ("adaptive_heun", 2.0)])
def test_stability_boundaries_on_the_negative_real_axis(method, boundary):
    """dopri5's is 3.3066 (Hairer & Wanner II, Fig. IV.2.1); its threshold 0.98 * 3.306 = 3.24 is Hairer's 3.25."""
    assert stability_boundary(ADAPTIVE_TABLEAUS[method]) == pytest.approx(boundary, abs=1e-3)


def test_which_tableaus_have_a_stage_pair():
    assert [name for name in CHECKED + UNCHECKED if stage_pair(ADAPTIVE_TABLEAUS[name])] == CHECKED
    assert stage_pair(ADAPTIVE_TABLEAUS["dopri5"]) == (6, 5)


@pytest.mark.parametrize("method", CHECKED)
@pytest.mark.parametrize("problem", ["forcing", "van der pol"])
def test_stiff_problems_stop_promptly_with_stiffness_error(method, problem):
    func, y0 = (stiff_forcing, torch.zeros(1, dtype=F64)) if problem == "forcing" else \
        (van_der_pol(1e4), torch.tensor([2.0, 0.0], dtype=F64))
    start = time.perf_counter()
    message = rf"^the problem seems to have become stiff at t=0\.0\d*: {method}'s last 15 checked steps were limited"
    with pytest.raises(fastcnf.StiffProblemError, match=message + r" by stability.*Use an implicit method"):
        fastcnf.odeint(func, y0, torch.tensor([0.0, 10.0], dtype=F64), rtol=1e-10, atol=1e-10, method=method,
                       options=dict(stiffness="error"))
    assert time.perf_counter() - start < 10.0


def test_the_default_warns_once_and_solves_on():
    """y' = -1e4 (y - cos t) on [0, 1]: about 3000 stability-limited steps, one warning, a right answer."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = fastcnf.odeint(lambda t, y: -1e4 * (y - torch.cos(t)), torch.zeros(1, dtype=F64),
                           torch.tensor([0.0, 1.0], dtype=F64), rtol=1e-6, atol=1e-8)
    stiff = [w for w in caught if issubclass(w.category, fastcnf.StiffnessWarning)]
    assert len(stiff) == 1
    assert "the problem seems to have become stiff at t=0.0" in str(stiff[0].message)
    assert "stiffness='error'" in str(stiff[0].message)
    exact = (1e8 * math.cos(1.0) + 1e4 * math.sin(1.0) - 1e8 * math.exp(-1e4)) / (1e8 + 1)
    assert y[-1].item() == pytest.approx(exact, rel=1e-6)


def test_the_check_costs_no_evaluations():
    def count(stiffness):
        calls = []

        def func(t, y):
            calls.append(1)
            return -1e4 * (y - torch.cos(t))

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fastcnf.StiffnessWarning)
            y = fastcnf.odeint(func, torch.zeros(1, dtype=F64), torch.tensor([0.0, 0.5], dtype=F64), rtol=1e-6,
                               atol=1e-8, options=dict(stiffness=stiffness))
        return len(calls), y

    (checked, y_checked), (unchecked, y_unchecked) = count("warn"), count("off")
    assert checked == unchecked
    torch.testing.assert_close(y_checked, y_unchecked, rtol=0, atol=0)


NON_STIFF = {
    "tanh": lambda dtype: (tanh_problem(dtype)[0], tanh_problem(dtype)[1], 2.0),
    "decay_sine": lambda dtype: (decay_sine, torch.ones(3, dtype=dtype), 10.0),
    "linear": lambda dtype: (linear, torch.tensor([1.0, 0.0, 1.0], dtype=dtype), 10.0),
    "kepler": lambda dtype: (kepler, torch.tensor([0.5, 0.0, 0.0, math.sqrt(3.0)], dtype=dtype), 20.0),
    "van der pol 1": lambda dtype: (van_der_pol(1.0), torch.tensor([2.0, 0.0], dtype=dtype), 20.0),
    "lorenz": lambda dtype: (lambda t, y: torch.stack([10 * (y[1] - y[0]), y[0] * (28 - y[2]) - y[1],
                                                       y[0] * y[1] - 8 / 3 * y[2]]),
                             torch.ones(3, dtype=dtype), 10.0),
}


@pytest.mark.parametrize("tolerance", [1e-3, 1e-6])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("method", CHECKED)
@pytest.mark.parametrize("problem", list(NON_STIFF))
def test_no_false_alarm_on_non_stiff_problems(problem, method, dtype, tolerance):
    """Every accepted step is checked here (not only every 50th); the largest estimate stays below 85% of
    the limit even at rtol=1e-3, where steps are longest, and no warning comes."""
    func, y0, end = NON_STIFF[problem](dtype)
    largest = []
    original = StiffnessCheck.observe

    def observe(self, stages, t, dt):
        largest.append(self.estimate(stages) / self.limit)
        original(self, stages, t, dt)

    try:
        StiffnessCheck.observe = observe
        with warnings.catch_warnings():
            warnings.simplefilter("error", fastcnf.StiffnessWarning)
            fastcnf.odeint(func, y0, torch.tensor([0.0, end], dtype=dtype), method=method, rtol=tolerance,
                           atol=tolerance * 1e-2)
    finally:
        StiffnessCheck.observe = original
    assert max(largest) < 0.85


@pytest.mark.parametrize("method", UNCHECKED)
def test_tableaus_without_a_stage_pair_run_unchecked_and_refuse_an_explicit_request(method):
    y = fastcnf.odeint(lambda t, y: -1e3 * (y - torch.cos(t)), torch.zeros(1, dtype=F64),
                       torch.tensor([0.0, 0.1], dtype=F64), method=method, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(y).all()
    for mode in ("warn", "error"):
        with pytest.raises(fastcnf.InvalidOptionError, match=rf"{method} evaluates no two stages at the same time"):
            fastcnf.odeint(decay_sine, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method=method,
                           options=dict(stiffness=mode))
    fastcnf.odeint(decay_sine, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method=method,
                   options=dict(stiffness="off"))


def test_bad_stiffness_values_are_refused():
    with pytest.raises(fastcnf.InvalidOptionError, match="option 'stiffness' value 'loud'; choose one of warn, "
                                                         "error, off"):
        fastcnf.odeint(decay_sine, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                       options=dict(stiffness="loud"))


@pytest.mark.parametrize("method", CHECKED)
def test_a_mild_stability_limit_over_a_long_span_is_no_alarm(method):
    """y' = -y on [0, 1000]: once e^-t is far below atol every step is stability-limited (dt ~ 3.4),
    but that costs about 300 steps; the check used to warn at t ~ 570 all the same."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastcnf.StiffnessWarning)
        y = fastcnf.odeint(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 1000.0], dtype=F64),
                           method=method)
    assert abs(y[-1].item()) < 1e-8
    with pytest.warns(fastcnf.StiffnessWarning, match=r"steps over a span of 1e\+04"):  # 3000 such steps
        fastcnf.odeint(lambda t, y: -y, torch.ones(1, dtype=F64), torch.tensor([0.0, 1e4], dtype=F64), method=method)
