"""The implicit Butcher tableaus: construction checks, order conditions, stability."""

import itertools
import math

import pytest
import torch

from fastcnf.ode.implicit.runge_kutta import stage_groups
from fastcnf.ode.implicit.tableaus import GAUSS_LEGENDRE_4, IMPLICIT_TABLEAUS, ImplicitTableau

TORCHDIFFEQ_NAMES = {"implicit_euler", "implicit_midpoint", "trapezoid", "radauIIA3", "gl4", "radauIIA5", "gl6",
                     "sdirk2", "trbdf2"}


def test_every_torchdiffeq_head_name_has_a_tableau():
    assert set(IMPLICIT_TABLEAUS) == TORCHDIFFEQ_NAMES


def _tensors(tableau):
    a = torch.tensor(tableau.a, dtype=torch.float64)
    b = torch.tensor(tableau.b, dtype=torch.float64)
    c = torch.tensor(tableau.c, dtype=torch.float64)
    return a, b, c


def _trees(order):
    """Rooted trees with ``order`` nodes as nested tuples of children (sorted, so each appears once)."""
    if order == 1:
        return [()]
    found = set()
    for sizes in _partitions(order - 1):
        for children in itertools.product(*[_trees(size) for size in sizes]):
            found.add(tuple(sorted(children)))
    return sorted(found)


def _partitions(total, largest=None):
    largest = total if largest is None else largest
    if total == 0:
        yield ()
        return
    for part in range(min(total, largest), 0, -1):
        for rest in _partitions(total - part, part):
            yield (part,) + rest


def _tree_size(tree):
    return 1 + sum(_tree_size(child) for child in tree)


def _tree_density(tree):
    return _tree_size(tree) * math.prod(_tree_density(child) for child in tree)


def _stage_weights(tree, a):
    """Phi_i(tree) without the final b: prod over children of (A @ Phi(child))."""
    weights = torch.ones(a.shape[0], dtype=torch.float64)
    for child in tree:
        weights = weights * (a @ _stage_weights(child, a))
    return weights


@pytest.mark.parametrize("name", sorted(IMPLICIT_TABLEAUS))
def test_order_conditions_hold_up_to_the_stated_order_and_not_beyond(name):
    """Butcher's rooted-tree conditions b^T Phi(tree) = 1 / tree! for every tree up to the order."""
    tableau = IMPLICIT_TABLEAUS[name]
    a, b, _ = _tensors(tableau)
    for order in range(1, tableau.order + 1):
        for tree in _trees(order):
            value = float(b @ _stage_weights(tree, a))
            assert value == pytest.approx(1 / _tree_density(tree), abs=1e-13), (order, tree)
    failures = [tree for tree in _trees(tableau.order + 1)
                if abs(float(b @ _stage_weights(tree, a)) - 1 / _tree_density(tree)) > 1e-10]
    assert failures, f"{name} satisfies the conditions of order {tableau.order + 1} too"


def test_tree_enumeration_counts():
    assert [len(_trees(order)) for order in range(1, 8)] == [1, 1, 2, 4, 9, 20, 48]


def _stability(tableau, z):
    """R(z) = 1 + z b^T (I - z A)^-1 1 for complex z."""
    a, b, _ = _tensors(tableau)
    eye = torch.eye(tableau.stages, dtype=torch.complex128)
    ones = torch.ones(tableau.stages, dtype=torch.complex128)
    z = torch.tensor(z, dtype=torch.complex128)
    return 1 + z * (b.to(torch.complex128) @ torch.linalg.solve(eye - z * a.to(torch.complex128), ones))


@pytest.mark.parametrize("name", sorted(IMPLICIT_TABLEAUS))
def test_a_stability_and_l_stability(name):
    tableau = IMPLICIT_TABLEAUS[name]
    for y in (0.1, 1.0, 10.0, 1e3):
        assert abs(_stability(tableau, complex(-1e-12, y))) <= 1 + 1e-9
    for x in (-0.5, -5.0, -50.0):
        assert abs(_stability(tableau, complex(x, 0))) < 1
    at_infinity = abs(_stability(tableau, complex(-1e9, 0)))
    if tableau.l_stable:
        assert at_infinity < 1e-6
    else:
        assert at_infinity == pytest.approx(1, abs=1e-6)


def test_gl4_nodes_are_both_gauss_points():
    assert GAUSS_LEGENDRE_4.c == pytest.approx((0.5 - math.sqrt(3) / 6, 0.5 + math.sqrt(3) / 6), abs=1e-16)


def test_torchdiffeq_head_gl4_tableau_is_rejected():
    """torchdiffeq head's gl4 has both nodes at 1/2 - sqrt(3)/6; the construction checks catch it."""
    s3 = math.sqrt(3)
    with pytest.raises(ValueError, match="row 1 of a does not sum to c"):
        ImplicitTableau("gl4_head", 4, (0.5 - s3 / 6, 0.5 - s3 / 6), ((0.25, 0.25 - s3 / 6), (0.25 + s3 / 6, 0.25)),
                        (0.5, 0.5), False)


@pytest.mark.parametrize("fields, message", [
    (dict(c=(0.5,), a=((0.5,),), b=(0.9,)), "b does not sum to 1"),
    (dict(c=(0.5,), a=((0.5, 0.0),), b=(1.0,)), "row 0 of a must have 1 entries"),
    (dict(c=(0.5, 1.0), a=((0.5,),), b=(0.5, 0.5)), "a must have 2 rows"),
    (dict(c=(0.5,), a=((0.5,),), b=(1.0, 0.0)), "b must have 1 entries"),
    (dict(c=(), a=(), b=()), "at least one stage"),
])
def test_construction_rejects_inconsistent_tableaus(fields, message):
    with pytest.raises(ValueError, match=message):
        ImplicitTableau(name="bad", order=1, l_stable=False, **fields)


def test_construction_rejects_an_order_the_nodes_cannot_give():
    with pytest.raises(ValueError, match="cannot give order 2"):
        ImplicitTableau(name="euler2", order=2, c=(1.0,), a=((1.0,),), b=(1.0,), l_stable=True)


@pytest.mark.parametrize("name, groups", [
    ("implicit_euler", [(0,)]),
    ("trapezoid", [(0,), (1,)]),
    ("sdirk2", [(0,), (1,)]),
    ("trbdf2", [(0,), (1,), (2,)]),
    ("gl4", [(0, 1)]),
    ("radauIIA5", [(0, 1, 2)]),
])
def test_stage_groups_follow_the_structure(name, groups):
    assert stage_groups(IMPLICIT_TABLEAUS[name]) == groups


def test_fully_implicit_method_with_an_explicit_first_stage_groups_the_rest():
    lobatto3 = ImplicitTableau(name="lobattoIIIA4", order=4, c=(0.0, 0.5, 1.0),
                               a=((0.0, 0.0, 0.0), (5 / 24, 1 / 3, -1 / 24), (1 / 6, 2 / 3, 1 / 6)),
                               b=(1 / 6, 2 / 3, 1 / 6), l_stable=False)
    assert stage_groups(lobatto3) == [(0,), (1, 2)]
