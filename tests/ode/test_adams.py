"""Adams methods (fastcnf/ode/multistep/adams.py, fastcnf/ode/multistep/coefficients.py): weights, convergence order,
the explicit_adams default that differs from torchdiffeq, and torchdiffeq's behaviour on request."""

import warnings

import numpy as np
import pytest
import torch
import torchdiffeq
from problems import CountingFunc, convergence_slope, decay_sine, decay_sine_exact

import fastcnf
from fastcnf.ode.multistep.coefficients import bashforth, moulton

Y0 = torch.tensor([1.0], dtype=torch.float64)
T_END = 4.0
T = torch.tensor([0.0, T_END], dtype=torch.float64)
EXACT = decay_sine_exact(T_END, [1.0])[0]


def error_at_end(method, **options):
    return abs(fastcnf.odeint(decay_sine, Y0, T, method=method, options=options, rtol=0.0, atol=1e-12)[-1].item()
               - EXACT)


def test_weights_match_the_textbook_tables():
    """AB4: (55, -59, 37, -9)/24; AM (4 derivatives): (9, 19, -5, 1)/24; each set sums to one."""
    np.testing.assert_allclose(bashforth(4), np.array([55, -59, 37, -9]) / 24, rtol=1e-15)
    np.testing.assert_allclose(moulton(4), np.array([9, 19, -5, 1]) / 24, rtol=1e-15)
    for steps in range(1, 13):
        assert sum(bashforth(steps)) == pytest.approx(1, abs=1e-12)
        assert sum(moulton(steps)) == pytest.approx(1, abs=1e-12)


@pytest.mark.parametrize("steps", range(1, 13))
def test_weights_match_torchdiffeq(steps):
    """torchdiffeq's integer tables. Its one-derivative Adams-Moulton entry (1/11) is never used
    (the corrector always has at least four derivatives), so it is left out."""
    from torchdiffeq._impl import fixed_adams

    np.testing.assert_allclose(bashforth(steps), fixed_adams._BASHFORTH_DIVISOR[steps].numpy(), rtol=1e-12)
    if steps > 1:
        np.testing.assert_allclose(moulton(steps), fixed_adams._MOULTON_DIVISOR[steps].numpy(), rtol=1e-12)


def test_explicit_adams_default_is_fourth_order():
    """Default max_order=5: the four-step Adams-Bashforth method after an RK4 start."""
    step_sizes = [0.1, 0.05, 0.025, 0.0125]
    errors = [error_at_end("explicit_adams", step_size=h) for h in step_sizes]
    assert abs(convergence_slope(step_sizes, errors) - 4) < 0.15, errors


def test_implicit_adams_is_fifth_order_with_max_order_five():
    """Predictor AB4 and the 5th-order corrector; max_iters=10 lets the corrector converge."""
    step_sizes = [0.1, 0.05, 0.025, 0.0125]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "functional iteration did not converge"
        errors = [error_at_end("implicit_adams", step_size=h, max_order=5, max_iters=10) for h in step_sizes]
    assert abs(convergence_slope(step_sizes, errors) - 5) < 0.2, errors


def test_implicit_adams_is_fourth_order_with_max_order_four():
    step_sizes = [0.1, 0.05, 0.025, 0.0125]
    errors = [error_at_end("implicit_adams", step_size=h, max_order=4, max_iters=10) for h in step_sizes]
    assert abs(convergence_slope(step_sizes, errors) - 4) < 0.15, errors


def test_explicit_adams_default_converges_where_torchdiffeqs_diverges():
    """y' = -y + sin t on [0, 4]. Errors at t=4 (float64):

        step size        0.1      0.05     0.02     0.01
        fastcnf (AB4)    1.5e-5   9.7e-7   2.6e-8   1.6e-9
        torchdiffeq      5.8e7    1.8e14   1.2e25   6.6e29

    torchdiffeq's default max_order=12 runs the 11-step Adams-Bashforth method, whose region of
    absolute stability is tiny; fastcnf defaults to max_order=5 (see fastcnf/ode/multistep/adams.py)."""
    for step_size, bound in [(0.1, 3e-5), (0.05, 2e-6), (0.02, 5e-8), (0.01, 3e-9)]:
        options = dict(step_size=step_size)
        ours = fastcnf.odeint(decay_sine, Y0, T, method="explicit_adams", options=options)
        theirs = torchdiffeq.odeint(decay_sine, Y0, T, method="explicit_adams", options=options)
        assert abs(ours[-1].item() - EXACT) < bound
        assert abs(theirs[-1].item() - EXACT) > 1e6


@pytest.mark.parametrize("step_size", [0.1, 0.02])
def test_max_order_twelve_reproduces_torchdiffeq(step_size):
    """Same unstable method, same numbers (rounding is amplified by the instability, so relative)."""
    options = dict(step_size=step_size, max_order=12)
    ours = fastcnf.odeint(decay_sine, Y0, T, method="explicit_adams", options=options)
    theirs = torchdiffeq.odeint(decay_sine, Y0, T, method="explicit_adams", options=dict(step_size=step_size))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["explicit_adams", "implicit_adams", "fixed_adams"])
@pytest.mark.parametrize("max_order", [4, 6, 12])
def test_agrees_with_torchdiffeq_at_equal_max_order(method, max_order):
    y0 = torch.tensor([1.0, -0.5], dtype=torch.float64)
    t = torch.linspace(0, 2, 7, dtype=torch.float64)
    options = dict(step_size=0.05, max_order=max_order)
    ours, theirs = CountingFunc(decay_sine), CountingFunc(decay_sine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchdiffeq's corrector warnings, mirrored by fastcnf
        expected = torchdiffeq.odeint(theirs, y0, t, method=method, options=options, rtol=1e-9, atol=1e-11)
        actual = fastcnf.odeint(ours, y0, t, method=method, options=options, rtol=1e-9, atol=1e-11)
    # explicit_adams with max_order=12 is unstable at this step and amplifies rounding differences.
    torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-12)
    assert ours.calls == theirs.calls


def test_corrector_that_does_not_converge_warns_like_torchdiffeq():
    options = dict(step_size=0.2, max_iters=1)
    with pytest.warns(UserWarning, match="Functional iteration did not converge"):
        fastcnf.odeint(decay_sine, Y0, T, method="implicit_adams", options=options, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["explicit_adams", "implicit_adams"])
@pytest.mark.parametrize("max_order", [1, 2, 3])
def test_max_order_below_four_warns_and_is_rk4(method, max_order):
    """With max_order < 4 every step is the RK4 start-up step, as in torchdiffeq (which fails with
    an IndexError for max_order=1)."""
    options = dict(step_size=0.1, max_order=max_order)
    with pytest.warns(UserWarning, match="reduces to `rk4`"):
        adams = fastcnf.odeint(decay_sine, Y0, T, method=method, options=options)
    rk4 = fastcnf.odeint(decay_sine, Y0, T, method="rk4", options=dict(step_size=0.1))
    torch.testing.assert_close(adams, rk4, rtol=0, atol=1e-14)
