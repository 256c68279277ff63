"""RNODE regularizers against direct computation; TPR projector, penalty and gradients (float64)."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastcnf.cnf import CNF, SolverSettings
from fastcnf.cnf.regularizers import (
    JacobianFrobenius,
    KineticEnergy,
    TrajectoryPolynomial,
    polynomial_basis,
    polynomial_residual,
)

TIGHT = SolverSettings("dopri5", rtol=1e-10, atol=1e-10)


class Linear(nn.Module):
    """f(t, z) = z A^T + b: trajectories are matrix exponentials."""

    def __init__(self, matrix, shift=None):
        super().__init__()
        self.matrix = nn.Parameter(torch.as_tensor(matrix, dtype=torch.float64))
        self.shift = nn.Parameter(torch.zeros(self.matrix.shape[0], dtype=torch.float64) if shift is None else
                                  torch.as_tensor(shift, dtype=torch.float64))

    def forward(self, t, z):
        return z @ self.matrix.t() + self.shift


def _points(num=5, seed=0):
    return torch.randn(num, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _integral(function, end, nodes=2000):
    """Composite Simpson rule on [0, end] of function(times) -> (len(times), ...)."""
    times = torch.linspace(0, end, 2 * nodes + 1, dtype=torch.float64)
    values = function(times)
    weights = torch.ones(2 * nodes + 1, dtype=torch.float64)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    return (weights[:, None] * values).sum(0) * (end / (2 * nodes)) / 3


def test_kinetic_energy_is_the_integral_of_the_squared_speed():
    matrix = torch.tensor([[-0.3, 1.0], [-1.0, 0.2]], dtype=torch.float64)
    x = _points()
    cnf = CNF(Linear(matrix), end_time=0.8, divergence="exact", regularizers=[KineticEnergy(2.0)],
              train_solver=TIGHT)
    cnf(x)
    def speed(times):
        flows = torch.linalg.matrix_exp(times[:, None, None] * matrix)  # (M, 2, 2)
        return (x @ flows.transpose(1, 2) @ matrix.t()).pow(2).sum(2)  # (M, B)

    expected = _integral(speed, 0.8).mean()
    torch.testing.assert_close(cnf.regularization_terms()["kinetic_energy"], expected, rtol=1e-8, atol=0)
    torch.testing.assert_close(cnf.regularization(), 2.0 * expected, rtol=1e-8, atol=0)


def test_jacobian_frobenius_exact_and_hutchinson():
    matrix = torch.tensor([[0.5, 2.0], [-1.0, 0.1]], dtype=torch.float64)
    x = _points()
    exact = CNF(Linear(matrix), end_time=0.7, divergence="exact", regularizers=[JacobianFrobenius()],
                train_solver=TIGHT)
    exact(x)
    torch.testing.assert_close(exact.regularization_terms()["jacobian_frobenius"], 0.7 * matrix.pow(2).sum())
    noisy = CNF(Linear(matrix), end_time=0.7, divergence="hutchinson-gaussian", regularizers=[JacobianFrobenius()],
                train_solver=TIGHT)
    noisy(x)
    eps = noisy.train_estimator.noise  # fixed for the solve: the integrand |eps^T A|^2 is constant in t
    expected = 0.7 * (eps @ matrix).pow(2).sum(1).mean()
    torch.testing.assert_close(noisy.regularization_terms()["jacobian_frobenius"], expected)


def test_regularizers_only_act_in_training_mode():
    cnf = CNF(Linear([[0.1, 0.0], [0.0, 0.2]]), divergence="exact",
              regularizers=[KineticEnergy(), TrajectoryPolynomial()])
    cnf.eval()
    cnf(_points())
    assert cnf.regularization() == 0.0 and cnf.regularization_terms() == {}


def test_polynomial_basis_is_orthonormal_and_reproduces_polynomials():
    s = torch.tensor([0.0, 0.1, 0.35, 0.4, 0.8, 1.0], dtype=torch.float64)
    for degree in (1, 2):
        q = polynomial_basis(s, degree)
        torch.testing.assert_close(q.t() @ q, torch.eye(degree + 1, dtype=torch.float64))
    quadratic = torch.stack([1 + 2 * s - 3 * s ** 2, -s ** 2], dim=1)[:, None, :]  # (n, 1, 2)
    assert polynomial_residual(s, quadratic, 2).abs().max() < 1e-13
    linear_fit = polynomial_residual(s, quadratic, 1)
    assert linear_fit.abs().max() > 1e-2
    # the residual of a least-squares line fit is orthogonal to 1 and s
    torch.testing.assert_close(linear_fit[:, 0, 0] @ torch.stack([torch.ones_like(s), s], 1),
                               torch.zeros(2, dtype=torch.float64), atol=1e-13, rtol=0)


def test_residual_agrees_with_numpy_style_lstsq_in_physical_time():
    s = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0], dtype=torch.float64)
    values = torch.sin(3 * s)[:, None]
    vandermonde = torch.stack([s ** 0, s, s ** 2], dim=1) * 1.0
    coefficients = torch.linalg.lstsq(vandermonde, values).solution
    torch.testing.assert_close(polynomial_residual(s, values, 2), values - vandermonde @ coefficients)


def _lstsq_penalty(times, states, degree):
    """The paper's penalty by direct least squares: a polynomial in t fitted to each (sample, entry)
    series with numpy, squared residuals summed over times, samples and entries, / (times x batch)."""
    n_times, batch = states.shape[:2]
    series = states.reshape(n_times, batch, -1)
    vandermonde = np.vander(times, degree + 1)
    total = 0.0
    for b in range(batch):
        for d in range(series.shape[2]):
            coefficients, *_ = np.linalg.lstsq(vandermonde, series[:, b, d], rcond=None)
            total += np.sum((series[:, b, d] - vandermonde @ coefficients) ** 2)
    return total / (n_times * batch)


def _hand_built_trajectory(times, batch=3, dim=2):
    """z_{b,d}(t) = amplitude sin(frequency t + phase) + 0.3 t^3, different for every (b, d)."""
    b, d = np.meshgrid(np.arange(batch), np.arange(dim), indexing="ij")
    amplitude, frequency, phase = 1.0 + 0.5 * b, 2.0 + d + 0.3 * b, 0.2 * (b + 2 * d)
    t = times[:, None, None]
    return amplitude * np.sin(frequency * t + phase) + 0.3 * t ** 3


@pytest.mark.parametrize("degree, num_times", [(1, 2), (1, 4), (2, 3), (3, 5)])
def test_tpr_penalty_is_the_papers_least_squares_residual(degree, num_times):
    end = 0.7  # the fit is in physical time; the penalty does not depend on T
    fractions = np.array([0.0] + sorted(np.random.default_rng(degree).uniform(0, 1, num_times)) + [1.0])
    states = _hand_built_trajectory(fractions * end)
    reg = TrajectoryPolynomial(degree=degree, num_times=num_times)
    value = reg.penalty(torch.from_numpy(fractions), torch.from_numpy(states))
    expected = _lstsq_penalty(fractions * end, states, degree)
    assert expected > 1e-6
    torch.testing.assert_close(value, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=0)
    # the log-density channel is one more entry per sample
    logp = np.cos(3 * fractions * end)[:, None] * np.arange(1, 4)[None, :]
    with_logp = reg.penalty(torch.from_numpy(fractions), (torch.from_numpy(states), torch.from_numpy(logp)))
    expected = _lstsq_penalty(fractions * end, np.concatenate([states, logp[:, :, None]], axis=2), degree)
    torch.testing.assert_close(with_logp, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=0)


def test_tpr_penalty_sums_over_dimensions_and_averages_over_samples():
    fractions = torch.tensor([0.0, 0.3, 0.6, 1.0], dtype=torch.float64)
    states = torch.from_numpy(_hand_built_trajectory(fractions.numpy()))
    reg = TrajectoryPolynomial()
    value = reg.penalty(fractions, states)
    torch.testing.assert_close(reg.penalty(fractions, torch.cat([states, states], dim=1)), value)  # 2x the batch
    torch.testing.assert_close(reg.penalty(fractions, torch.cat([states, states], dim=2)), 2 * value)  # 2x dims


def test_tpr_penalty_gradient_matches_gradcheck():
    reg = TrajectoryPolynomial(degree=2, num_times=3)
    s = torch.tensor([0.0, 0.3, 0.5, 0.7, 1.0], dtype=torch.float64)
    z = torch.randn(5, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: reg.penalty(s, x), (z,))


def _tpr_cnf(matrix, shift=None, adjoint=True, degree=1):
    solver = SolverSettings("dopri5", rtol=1e-10, atol=1e-10, adjoint=adjoint)
    return CNF(Linear(matrix, shift), end_time=1.3, divergence="exact",
               regularizers=[TrajectoryPolynomial(weight=1.0, degree=degree, num_times=4)], train_solver=solver)


def test_tpr_penalty_vanishes_on_polynomial_trajectories():
    # f = A z + b with A nilpotent: z(t) = z0 + t (A z0 + b) + t^2/2 A b -> degree 2, and tr(A) = 0
    nilpotent = [[0.0, 1.0], [0.0, 0.0]]
    torch.manual_seed(0)
    cnf = _tpr_cnf(nilpotent, shift=[0.3, -0.7], degree=2)
    cnf(_points())
    assert cnf.regularization_terms()["trajectory_polynomial"] < 1e-18
    linear_only = _tpr_cnf(nilpotent, shift=[0.3, -0.7], degree=1)
    linear_only(_points())
    assert linear_only.regularization_terms()["trajectory_polynomial"] > 1e-4


def test_tpr_penalty_and_gradients_under_the_adjoint():
    rotation = torch.tensor([[0.0, 2.0], [-2.0, 0.1]], dtype=torch.float64)
    x = _points()
    results = []
    for adjoint in (True, False):
        cnf = _tpr_cnf(rotation, adjoint=adjoint)
        torch.manual_seed(5)  # the same random times in both solves
        cnf(x)
        penalty = cnf.regularization()
        (grad,) = torch.autograd.grad(penalty, cnf.net.matrix)
        results.append((penalty.detach(), grad))
    assert results[0][0] > 1e-3
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-9, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-9)

    def penalty_at(matrix):
        cnf = _tpr_cnf(matrix)
        torch.manual_seed(5)
        with torch.no_grad():
            cnf(x)
        return cnf.regularization()

    step = 1e-6
    bump = torch.zeros_like(rotation)
    bump[0, 1] = step
    finite_difference = (penalty_at(rotation + bump) - penalty_at(rotation - bump)) / (2 * step)
    torch.testing.assert_close(results[0][1][0, 1], finite_difference, rtol=1e-5, atol=1e-8)


class Swirl(nn.Module):
    """A nonlinear f(t, z) = tanh(z A^T) + t b, whose log-density channel is not linear in t."""

    def __init__(self):
        super().__init__()
        self.matrix = nn.Parameter(torch.tensor([[0.4, 1.5], [-1.2, 0.8]], dtype=torch.float64))
        self.shift = nn.Parameter(torch.tensor([0.5, -0.3], dtype=torch.float64))

    def forward(self, t, z):
        return torch.tanh(z @ self.matrix.t()) + t * self.shift


def test_tpr_in_a_cnf_fits_z_only_unless_include_logp():
    from fastcnf import odeint

    x = _points(7)
    terms = {}
    for include_logp in (False, True):
        reg = TrajectoryPolynomial(weight=5.0, include_logp=include_logp)
        cnf = CNF(Swirl(), end_time=0.9, divergence="exact", regularizers=[reg], train_solver=TIGHT)
        torch.manual_seed(3)
        cnf(x)
        terms[include_logp] = cnf.regularization_terms()["trajectory_polynomial"]
        torch.manual_seed(3)
        fractions = reg.sample_fractions()
        with torch.no_grad():
            z, logp = odeint(cnf.dynamics, (x, torch.zeros(7, dtype=torch.float64)), fractions * 0.9,
                             rtol=1e-10, atol=1e-10)
        expected = _lstsq_penalty((fractions * 0.9).numpy(), np.concatenate(
            [z.numpy(), logp.numpy()[:, :, None]], axis=2) if include_logp else z.numpy(), 1)
        torch.testing.assert_close(terms[include_logp].detach(), torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-6, atol=0)
        torch.testing.assert_close(cnf.regularization(), 5.0 * terms[include_logp])
    assert terms[True] > terms[False] * (1 + 1e-3)


def test_tpr_random_times_are_sorted_inside_the_interval():
    reg = TrajectoryPolynomial(num_times=6)
    fractions = reg.sample_fractions()
    assert fractions[0] == 0 and fractions[-1] == 1 and len(fractions) == 8
    assert bool((fractions[1:] > fractions[:-1]).all())


@pytest.mark.parametrize("build, message", [
    (lambda: KineticEnergy(-1.0), "weight must be a finite number >= 0"),
    (lambda: JacobianFrobenius(math.nan), "weight must be a finite number >= 0"),
    (lambda: TrajectoryPolynomial(degree=0), "degree must be a positive integer"),
    (lambda: TrajectoryPolynomial(degree=1.5), "degree must be a positive integer"),
    (lambda: TrajectoryPolynomial(degree=3), "num_times must be an integer >= degree=3"),
    (lambda: TrajectoryPolynomial(degree=2, num_times=2.0), "num_times must be an integer >= degree=2"),
    (lambda: TrajectoryPolynomial(include_logp="yes"), "include_logp must be True or False"),
])
def test_bad_arguments_are_rejected(build, message):
    with pytest.raises(ValueError, match=message):
        build()
