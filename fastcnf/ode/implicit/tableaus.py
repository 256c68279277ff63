"""Implicit Runge-Kutta methods as Butcher tableaus (data only).

A tableau with ``S`` stages holds nodes ``c`` (S,), the full matrix ``a`` (S, S) and the
weights ``b`` (S,). Stage ``i`` solves ``k_i = f(t0 + c_i dt, y0 + dt * sum_j a_ij k_j)`` and
the step is ``y1 = y0 + dt * sum_i b_i k_i``. Coefficients are the closed forms (rationals and
square roots), written out once here.

Every tableau is checked on construction: shapes, rows of ``a`` summing to ``c``, weights
summing to one, and the quadrature conditions ``sum_i b_i c_i^(k-1) = 1/k`` for ``k`` up to
the stated order (a method of order p integrates polynomials of degree p-1 in t exactly).
torchdiffeq's gl4 tableau, whose two nodes are both 1/2 - sqrt(3)/6, fails both the row-sum
and the quadrature check. The full convergence orders are measured in the tests.

``l_stable`` marks the methods whose stability function vanishes at infinity (stiff
components are damped in one step); the others are A-stable only.
"""

import math
from dataclasses import dataclass

from ..explicit.tableaus import require

__all__ = [
    "ImplicitTableau",
    "IMPLICIT_EULER",
    "IMPLICIT_MIDPOINT",
    "TRAPEZOID",
    "RADAU_IIA_3",
    "GAUSS_LEGENDRE_4",
    "RADAU_IIA_5",
    "GAUSS_LEGENDRE_6",
    "SDIRK2",
    "TRBDF2",
    "IMPLICIT_TABLEAUS",
]

_CHECK_TOL = 1e-13


@dataclass(frozen=True)
class ImplicitTableau:
    """An implicit Runge-Kutta method; see the module docstring for the fields."""

    name: str
    order: int
    c: tuple
    a: tuple
    b: tuple
    l_stable: bool

    def __post_init__(self):
        stages = len(self.c)
        require(stages > 0, f"{self.name}: a tableau needs at least one stage")
        require(len(self.b) == stages, f"{self.name}: b must have {stages} entries")
        require(len(self.a) == stages, f"{self.name}: a must have {stages} rows")
        for i, row in enumerate(self.a):
            require(len(row) == stages, f"{self.name}: row {i} of a must have {stages} entries")
            require(abs(sum(row) - self.c[i]) < _CHECK_TOL, f"{self.name}: row {i} of a does not sum to c[{i}]")
        require(abs(sum(self.b) - 1) < _CHECK_TOL, f"{self.name}: b does not sum to 1")
        for k in range(1, self.order + 1):
            quadrature = sum(b * c ** (k - 1) for b, c in zip(self.b, self.c))
            require(abs(quadrature - 1 / k) < _CHECK_TOL,
                     f"{self.name}: sum_i b_i c_i^{k - 1} = {quadrature!r}, not 1/{k}; the nodes and weights "
                     f"cannot give order {self.order}")

    @property
    def stages(self):
        return len(self.c)

    @property
    def diagonally_implicit(self):
        """True when ``a`` is lower triangular: stages can be solved one after another."""
        return all(self.a[i][j] == 0 for i in range(self.stages) for j in range(i + 1, self.stages))

    def explicit_stage(self, i):
        """True when stage ``i`` depends on no unknown stage (its row of ``a`` is zero from ``i`` on)."""
        return all(self.a[i][j] == 0 for j in range(i, self.stages))


def _rows(*rows):
    return tuple(tuple(float(x) for x in row) for row in rows)


def _floats(*values):
    return tuple(float(x) for x in values)


_SQRT2 = math.sqrt(2)
_SQRT3 = math.sqrt(3)
_SQRT6 = math.sqrt(6)
_SQRT15 = math.sqrt(15)

IMPLICIT_EULER = ImplicitTableau(
    name="implicit_euler", order=1, c=_floats(1), a=_rows([1]), b=_floats(1), l_stable=True)

# One-stage Gauss-Legendre.
IMPLICIT_MIDPOINT = ImplicitTableau(
    name="implicit_midpoint", order=2, c=_floats(1 / 2), a=_rows([1 / 2]), b=_floats(1), l_stable=False)

# Two-stage Lobatto IIIA; the first stage is f(t0, y0).
TRAPEZOID = ImplicitTableau(
    name="trapezoid", order=2, c=_floats(0, 1), a=_rows([0, 0], [1 / 2, 1 / 2]), b=_floats(1 / 2, 1 / 2),
    l_stable=False)

RADAU_IIA_3 = ImplicitTableau(
    name="radauIIA3",
    order=3,
    c=_floats(1 / 3, 1),
    a=_rows([5 / 12, -1 / 12], [3 / 4, 1 / 4]),
    b=_floats(3 / 4, 1 / 4),
    l_stable=True,
)

# Two-stage Gauss-Legendre; nodes 1/2 -+ sqrt(3)/6.
GAUSS_LEGENDRE_4 = ImplicitTableau(
    name="gl4",
    order=4,
    c=_floats(1 / 2 - _SQRT3 / 6, 1 / 2 + _SQRT3 / 6),
    a=_rows([1 / 4, 1 / 4 - _SQRT3 / 6], [1 / 4 + _SQRT3 / 6, 1 / 4]),
    b=_floats(1 / 2, 1 / 2),
    l_stable=False,
)

RADAU_IIA_5 = ImplicitTableau(
    name="radauIIA5",
    order=5,
    c=_floats((4 - _SQRT6) / 10, (4 + _SQRT6) / 10, 1),
    a=_rows(
        [(88 - 7 * _SQRT6) / 360, (296 - 169 * _SQRT6) / 1800, (-2 + 3 * _SQRT6) / 225],
        [(296 + 169 * _SQRT6) / 1800, (88 + 7 * _SQRT6) / 360, (-2 - 3 * _SQRT6) / 225],
        [(16 - _SQRT6) / 36, (16 + _SQRT6) / 36, 1 / 9],
    ),
    b=_floats((16 - _SQRT6) / 36, (16 + _SQRT6) / 36, 1 / 9),
    l_stable=True,
)

# Three-stage Gauss-Legendre; nodes 1/2 - sqrt(15)/10, 1/2, 1/2 + sqrt(15)/10.
GAUSS_LEGENDRE_6 = ImplicitTableau(
    name="gl6",
    order=6,
    c=_floats(1 / 2 - _SQRT15 / 10, 1 / 2, 1 / 2 + _SQRT15 / 10),
    a=_rows(
        [5 / 36, 2 / 9 - _SQRT15 / 15, 5 / 36 - _SQRT15 / 30],
        [5 / 36 + _SQRT15 / 24, 2 / 9, 5 / 36 - _SQRT15 / 24],
        [5 / 36 + _SQRT15 / 30, 2 / 9 + _SQRT15 / 15, 5 / 36],
    ),
    b=_floats(5 / 18, 4 / 9, 5 / 18),
    l_stable=False,
)

# Two-stage, stiffly accurate SDIRK with gamma = 1 - sqrt(2)/2 (Alexander 1977).
_GAMMA = 1 - _SQRT2 / 2
SDIRK2 = ImplicitTableau(
    name="sdirk2",
    order=2,
    c=_floats(_GAMMA, 1),
    a=_rows([_GAMMA, 0], [1 - _GAMMA, _GAMMA]),
    b=_floats(1 - _GAMMA, _GAMMA),
    l_stable=True,
)

# TR-BDF2 (Bank et al. 1985; Hosea & Shampine 1996) as a three-stage ESDIRK: a trapezoidal
# stage to t0 + 2d dt followed by a BDF2 stage to t1, with d = 1 - sqrt(2)/2 and w = sqrt(2)/4.
_D = 1 - _SQRT2 / 2
_W = _SQRT2 / 4
TRBDF2 = ImplicitTableau(
    name="trbdf2",
    order=2,
    c=_floats(0, 2 * _D, 1),
    a=_rows([0, 0, 0], [_D, _D, 0], [_W, _W, _D]),
    b=_floats(_W, _W, _D),
    l_stable=True,
)

IMPLICIT_TABLEAUS = {t.name: t for t in (IMPLICIT_EULER, IMPLICIT_MIDPOINT, TRAPEZOID, RADAU_IIA_3, GAUSS_LEGENDRE_4,
                                         RADAU_IIA_5, GAUSS_LEGENDRE_6, SDIRK2, TRBDF2)}
