"""Adams-Bashforth and Adams-Moulton weights, computed exactly from their definition.

The k-step Adams-Bashforth weights integrate over one step the polynomial through the last k
derivatives; Adams-Moulton additionally uses the derivative at the new point. Weights are
built with exact rationals and returned as floats, newest derivative first.
"""

from fractions import Fraction
from functools import lru_cache

__all__ = ["bashforth", "moulton"]


def _lagrange_integrals(nodes):
    """Integral over s in [0, 1] of each Lagrange basis polynomial on ``nodes`` (in steps)."""
    weights = []
    for j, node_j in enumerate(nodes):
        coefficients = [Fraction(1)]  # polynomial in s, lowest power first
        for m, node_m in enumerate(nodes):
            if m == j:
                continue
            scale = Fraction(1, 1) / (node_j - node_m)
            shifted = [Fraction(0)] * (len(coefficients) + 1)
            for power, value in enumerate(coefficients):  # multiply by (s - node_m) * scale
                shifted[power + 1] += value * scale
                shifted[power] -= value * node_m * scale
            coefficients = shifted
        weights.append(sum(value / (power + 1) for power, value in enumerate(coefficients)))
    return weights


@lru_cache(maxsize=None)
def bashforth(steps):
    """Weights of f_n, f_{n-1}, ..., f_{n-steps+1} for y_{n+1} = y_n + h * sum."""
    return tuple(float(w) for w in _lagrange_integrals([Fraction(-j) for j in range(steps)]))


@lru_cache(maxsize=None)
def moulton(steps):
    """Weights of f_{n+1}, f_n, ..., f_{n-steps+2} (``steps`` derivatives, the first implicit)."""
    return tuple(float(w) for w in _lagrange_integrals([Fraction(1 - j) for j in range(steps)]))
