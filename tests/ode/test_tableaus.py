"""Butcher tableaus: algebraic order conditions, observed convergence order at fixed steps,
the FSAL property and construction checks (fastcnf/ode/explicit/tableaus.py, fastcnf/ode/explicit/stepper.py)."""

import dataclasses
from functools import lru_cache

import numpy as np
import pytest
import torch
from problems import convergence_slope, kepler, kepler_exact

from fastcnf.ode.explicit.stepper import ExplicitRKStepper
from fastcnf.ode.explicit.tableaus import ADAPTIVE_TABLEAUS, FIXED_TABLEAUS, TSIT5, ButcherTableau

ALL_TABLEAUS = {**ADAPTIVE_TABLEAUS, **FIXED_TABLEAUS}

# Order of the embedded solution b - b_error that the error estimate compares against.
EMBEDDED_ORDER = {"dopri8": 7, "dopri5": 4, "tsit5": 4, "bosh3": 2, "fehlberg2": 1, "adaptive_heun": 1}


# ---------------------------------------------------------------- rooted trees
@lru_cache(maxsize=None)
def rooted_trees(order):
    """All rooted trees with ``order`` nodes; a tree is the sorted tuple of its subtrees."""
    if order == 1:
        return ((),)
    found = set()

    def extend(remaining, children):
        if remaining == 0:
            found.add(tuple(sorted(children)))
            return
        for size in range(1, remaining + 1):
            for child in rooted_trees(size):
                extend(remaining - size, children + [child])

    extend(order - 1, [])
    return tuple(sorted(found))


def tree_size(tree):
    return 1 + sum(tree_size(child) for child in tree)


def tree_density(tree):
    """gamma(tree): the exact solution's weight is 1 / gamma."""
    density = tree_size(tree)
    for child in tree:
        density *= tree_density(child)
    return density


def stage_weights(tree, a):
    """Phi_i(tree) for every stage i: the product over subtrees of a @ Phi(subtree)."""
    weights = np.ones(a.shape[0])
    for child in tree:
        weights = weights * (a @ stage_weights(child, a))
    return weights


def order_condition_residual(a, b, order):
    """Largest |b . Phi(tree) - 1/gamma(tree)| over the trees with ``order`` nodes."""
    return max(abs(b @ stage_weights(tree, a) - 1.0 / tree_density(tree)) for tree in rooted_trees(order))


def matrix_a(tableau):
    a = np.zeros((tableau.stages, tableau.stages))
    for i, row in enumerate(tableau.a):
        a[i, :len(row)] = row
    return a


def test_rooted_tree_counts():
    """1, 1, 2, 4, 9, 20, 48, 115, 286 trees (OEIS A000081): the enumeration is complete."""
    assert [len(rooted_trees(n)) for n in range(1, 10)] == [1, 1, 2, 4, 9, 20, 48, 115, 286]


# ---------------------------------------------------------------- algebraic order
@pytest.mark.parametrize("name", list(ALL_TABLEAUS))
def test_solution_weights_have_exactly_the_stated_order(name):
    """Every order condition up to ``tableau.order`` holds; at least one of the next order fails."""
    tableau = ALL_TABLEAUS[name]
    a, b = matrix_a(tableau), np.array(tableau.b)
    for order in range(1, tableau.order + 1):
        assert order_condition_residual(a, b, order) < 1e-12, f"{name}: condition of order {order}"
    assert order_condition_residual(a, b, tableau.order + 1) > 1e-6


@pytest.mark.parametrize("name", list(ADAPTIVE_TABLEAUS))
def test_embedded_weights_have_one_order_less(name):
    """b - b_error (the embedded solution of the error estimate) has its own, lower order."""
    tableau = ADAPTIVE_TABLEAUS[name]
    a = matrix_a(tableau)
    embedded = np.array(tableau.b) - np.array(tableau.b_error)
    order = EMBEDDED_ORDER[name]
    assert order < tableau.order
    for condition in range(1, order + 1):
        assert order_condition_residual(a, embedded, condition) < 1e-12
    assert order_condition_residual(a, embedded, order + 1) > 1e-6


# ---------------------------------------------------------------- observed order
def kepler_error_at_fixed_steps(tableau, steps, end=3.0):
    """Max error at t=end of ``steps`` equal steps of ``tableau`` on the Kepler problem (float64)."""
    y0 = torch.tensor(kepler_exact(0.0))
    stepper = ExplicitRKStepper(tableau, lambda t, y, perturb=0: kepler(torch.tensor(t), y), 4, torch.float64,
                                y0.device, perturb_end=False)
    dt, y = end / steps, y0
    with torch.no_grad():
        for k in range(steps):
            t0 = k * dt
            y, _, _ = stepper.step(t0, y, kepler(torch.tensor(t0), y), dt, t0 + dt)
    return float((y - torch.tensor(kepler_exact(end))).abs().max())


# Step counts in each method's asymptotic range, errors between about 1e-3 and 1e-12.
STEP_COUNTS = {1: [400, 800, 1600, 3200], 2: [200, 400, 800, 1600], 3: [100, 200, 400, 800],
               4: [80, 160, 320, 640], 5: [60, 120, 240, 480], 8: [24, 32, 48, 64]}


@pytest.mark.parametrize("name", list(ALL_TABLEAUS))
def test_observed_order_at_fixed_steps_on_kepler(name):
    """Global error ~ C dt^p on a nonlinear problem; the slope of log(error) vs log(dt) is p."""
    tableau = ALL_TABLEAUS[name]
    steps = STEP_COUNTS[tableau.order]
    errors = [kepler_error_at_fixed_steps(tableau, n) for n in steps]
    slope = convergence_slope([3.0 / n for n in steps], errors)
    assert abs(slope - tableau.order) < 0.3, (errors, slope)


def test_tsit5_propagates_its_fifth_order_solution():
    """fastcnf steps with Tsitouras' fifth-order weights. torchdiffeq's repository head steps with
    the embedded combination b - b_error, which is only fourth order: on the same steps its
    error converges one order slower and is over 100x larger at 480 steps."""
    steps = STEP_COUNTS[5]
    embedded = dataclasses.replace(TSIT5, name="tsit5-embedded",
                                   b=tuple(b - e for b, e in zip(TSIT5.b, TSIT5.b_error)))
    fifth = [kepler_error_at_fixed_steps(TSIT5, n) for n in steps]
    fourth = [kepler_error_at_fixed_steps(embedded, n) for n in steps]
    dts = [3.0 / n for n in steps]
    assert abs(convergence_slope(dts, fifth) - 5) < 0.3
    assert abs(convergence_slope(dts, fourth) - 4) < 0.3
    assert fourth[-1] > 100 * fifth[-1]


# ---------------------------------------------------------------- structure
def test_fsal_tableaus():
    """First-same-as-last: the last stage is f(t1, y1) and becomes the next step's first stage."""
    fsal = {name for name, tableau in ALL_TABLEAUS.items() if tableau.fsal}
    assert fsal == {"dopri8", "dopri5", "tsit5", "bosh3"}


@pytest.mark.parametrize("name", list(ADAPTIVE_TABLEAUS))
def test_adaptive_tableaus_carry_error_and_midpoint_weights(name):
    tableau = ADAPTIVE_TABLEAUS[name]
    assert tableau.adaptive
    assert len(tableau.b_error) == len(tableau.b_mid) == tableau.stages
    assert abs(sum(tableau.b_error)) < 1e-12
    assert abs(sum(tableau.b_mid) - 0.5) < 1e-12  # y_mid - y0 ~ dt/2 * f for constant f


@pytest.mark.parametrize("field, value, message", [
    ("a", ((), (0.4,)), "row 1 of a does not sum to c"),
    ("b", (0.3, 0.3), "b does not sum to 1"),
    ("c", (0.1, 0.5), "first node must be 0"),
    ("b_error", (0.5, -0.4), "b_error does not sum to 0"),
    ("b_mid", (0.5,), "b_mid must have 2 entries"),
])
def test_malformed_tableau_is_rejected(field, value, message):
    fields = dict(name="bad", order=2, c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0), b_error=(0.5, -0.5),
                  b_mid=(0.25, 0.25))
    fields[field] = value
    with pytest.raises(ValueError, match=message):
        ButcherTableau(**fields)
