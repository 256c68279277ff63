"""Regularizers of CNF training that make the dynamics cheaper to integrate.

State regularizers are integrals along the trajectory, carried as extra augmented states so they
work under ``odeint_adjoint`` (RNODE):

    KineticEnergy        weight * mean_b  int_0^T |f(t, z_b)|^2 dt
    JacobianFrobenius    weight * mean_b  int_0^T |eps^T df/dz|^2 dt   (same noise as the divergence;
                                                                        the exact estimator gives |df/dz|_F^2)

``TrajectoryPolynomial`` (TPR) reads the states at a few random times in [0, T] plus the end
points, requested as extra output times of the solve (dense output: no extra function
evaluations, gradients flow under the adjoint), fits a polynomial of degree 1 or 2 in t to them
by least squares and penalizes the residual:

    weight * mean |(I - P) Z|^2,   Z: (n_times, state entries),  P = Q Q^T

with Q an orthonormal basis (QR, float64) of the Legendre-Vandermonde matrix in the normalized
time s = t / T mapped to [-1, 1], so P does not depend on T and stays well conditioned.
"""

import torch

from ..ode.validation import require_choice, require_non_negative

__all__ = ["KineticEnergy", "JacobianFrobenius", "TrajectoryPolynomial", "polynomial_basis", "polynomial_residual",
           "REGULARIZERS"]


def _check_weight(weight):
    return require_non_negative("regularizer weight", weight)


def _per_sample_sum(values):
    return values.reshape(values.shape[0], -1).sum(dim=1)


class _StateRegularizer:
    """A regularizer integrated as an extra augmented state; subclasses define ``rate``."""

    is_state = True
    needs_frobenius = False

    def __init__(self, weight=0.01):
        self.weight = _check_weight(weight)

    def __repr__(self):
        return f"{type(self).__name__}(weight={self.weight})"


class KineticEnergy(_StateRegularizer):
    """RNODE kinetic energy: the integral of |f|^2 per sample, averaged over the batch."""

    name = "kinetic_energy"

    def rate(self, estimate):
        """d/dt of the state: |f(t, z)|^2 per sample, (B,)."""
        return _per_sample_sum(estimate.f.pow(2))


class JacobianFrobenius(_StateRegularizer):
    """RNODE Jacobian regularizer: the integral of the divergence estimator's |df/dz|_F^2 estimate."""

    name = "jacobian_frobenius"
    needs_frobenius = True

    def rate(self, estimate):
        """d/dt of the state: the squared Frobenius estimate per sample, (B,)."""
        return estimate.frobenius

    def __repr__(self):
        return f"JacobianFrobenius(weight={self.weight})"


def polynomial_basis(fractions, degree):
    """Orthonormal basis (n, degree + 1), float64, of polynomials of ``degree`` sampled at ``fractions``.

    ``fractions`` are times normalized to [0, 1] (1-D, n > degree distinct values).
    """
    s = torch.as_tensor(fractions, dtype=torch.float64).reshape(-1)
    x = 2.0 * s - 1.0
    vandermonde = torch.stack([torch.special.legendre_polynomial_p(x, k) for k in range(degree + 1)], dim=1)
    q, _ = torch.linalg.qr(vandermonde)
    return q


def polynomial_residual(fractions, trajectory, degree):
    """(I - P) Z for Z = ``trajectory`` of shape (n, ...), P the projector onto polynomials in time."""
    q = polynomial_basis(fractions, degree).to(dtype=trajectory.dtype, device=trajectory.device)
    flat = trajectory.reshape(trajectory.shape[0], -1)
    return (flat - q @ (q.t() @ flat)).reshape(trajectory.shape)


class TrajectoryPolynomial:
    """TPR: least-squares polynomial fit of the trajectory at random times, residual penalized.

    Args:
        weight: lambda (the paper uses about 5).
        degree: polynomial degree, 1 or 2.
        num_times: K random interior times drawn uniformly in (0, T) per solve (K >= degree, so
            the K + 2 points over-determine the fit).
        include_logp: also fit the log-density state (the solver controls its error too).
    """

    name = "trajectory_polynomial"
    is_state = False
    needs_frobenius = False
    DEGREES = (1, 2)

    def __init__(self, weight=5.0, degree=2, num_times=4, include_logp=True):
        self.weight = _check_weight(weight)
        require_choice("degree", degree, self.DEGREES)
        if isinstance(num_times, bool) or not isinstance(num_times, int) or num_times < degree:
            raise ValueError(f"num_times must be an integer >= degree={degree}, got {num_times!r}.")
        self.degree, self.num_times, self.include_logp = degree, num_times, bool(include_logp)

    def sample_fractions(self, device=None):
        """Sorted normalized times [0, u_1, ..., u_K, 1] (float64), u_k ~ U(0, 1) from the global RNG."""
        interior = torch.rand(self.num_times, dtype=torch.float64, device=device).clamp_(1e-6, 1 - 1e-6)
        interior, _ = torch.sort(interior)
        ends = torch.tensor([0.0, 1.0], dtype=torch.float64, device=device)
        return torch.cat([ends[:1], interior, ends[1:]])

    def penalty(self, fractions, states):
        """Unweighted mean squared residual for ``states``: a tensor (n, B, ...) or a tuple of them."""
        states = states if isinstance(states, (tuple, list)) else (states,)
        flat = torch.cat([s.reshape(s.shape[0], -1) for s in states], dim=1)
        return polynomial_residual(fractions, flat, self.degree).pow(2).mean()

    def __repr__(self):
        return (f"TrajectoryPolynomial(weight={self.weight}, degree={self.degree}, num_times={self.num_times}, "
                f"include_logp={self.include_logp})")


REGULARIZERS = {cls.name: cls for cls in (KineticEnergy, JacobianFrobenius, TrajectoryPolynomial)}
