"""Regularizers of CNF training that make the dynamics cheaper to integrate.

State regularizers are integrals along the trajectory, carried as extra augmented states so they
work under ``odeint_adjoint`` (RNODE):

    KineticEnergy        weight * mean_b  int_0^T |f(t, z_b)|^2 dt
    JacobianFrobenius    weight * mean_b  int_0^T |eps^T df/dz|^2 dt   (same noise as the divergence;
                                                                        the exact estimator gives |df/dz|_F^2)

``TrajectoryPolynomial`` (TPR, Huang & Yeh 2021) reads the states at K random times in (0, T)
plus the end points, requested as extra output times of the solve (dense output: no extra
function evaluations, gradients flow under the adjoint), fits a polynomial of degree p in t to
them by least squares, independently per sample and state entry, and penalizes the residual with
the paper's normalization:

    weight * 1/(M B) sum_{i, b, d} ((I - P) Z)_{i,b,d}^2,   M = K + 2 times, B samples, d over z's entries

(a sum over the state dimensions, not a mean), P = Q Q^T the projector onto polynomials in time
and Q an orthonormal basis (QR, float64) of the Legendre-Vandermonde matrix in the normalized
time s = t / T mapped to [-1, 1], so P does not depend on T and stays well conditioned. Only z is
fitted unless ``include_logp`` (then the log-density channel counts as one more entry).
"""

import torch

from ..ode.validation import require_bool, require_non_negative, require_positive_int

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
        weight: lambda, multiplying the penalty in the loss (the authors use 5).
        degree: polynomial degree p >= 1 (the authors use 1: straight lines).
        num_times: K >= degree random interior times drawn uniformly in (0, T) per solve; with the
            two end points the M = K + 2 >= p + 2 times over-determine the fit (the authors use 2).
        include_logp: also fit the log-density state (the paper fits z only).
    """

    name = "trajectory_polynomial"
    is_state = False
    needs_frobenius = False

    def __init__(self, weight=5.0, degree=1, num_times=2, include_logp=False):
        self.weight = _check_weight(weight)
        self.degree = require_positive_int("degree", degree)
        if isinstance(num_times, bool) or not isinstance(num_times, int) or num_times < degree:
            raise ValueError(f"num_times must be an integer >= degree={degree}, got {num_times!r}.")
        self.num_times = num_times
        self.include_logp = require_bool("include_logp", include_logp)

    def sample_fractions(self, device=None):
        """Sorted normalized times [0, u_1, ..., u_K, 1] (float64), u_k ~ U(0, 1) from the global RNG."""
        interior = torch.rand(self.num_times, dtype=torch.float64, device=device).clamp_(1e-6, 1 - 1e-6)
        interior, _ = torch.sort(interior)
        ends = torch.tensor([0.0, 1.0], dtype=torch.float64, device=device)
        return torch.cat([ends[:1], interior, ends[1:]])

    def penalty(self, fractions, states):
        """Unweighted paper penalty: squared residual summed over times, samples and state entries,
        divided by (number of times x batch). ``states``: a tensor (n_times, B, ...) or a tuple of
        them (their entries per sample are concatenated)."""
        states = states if isinstance(states, (tuple, list)) else (states,)
        n_times, batch = states[0].shape[:2]
        flat = torch.cat([s.reshape(n_times, batch, -1) for s in states], dim=2)
        return polynomial_residual(fractions, flat, self.degree).pow(2).sum() / (n_times * batch)

    def __repr__(self):
        return (f"TrajectoryPolynomial(weight={self.weight}, degree={self.degree}, num_times={self.num_times}, "
                f"include_logp={self.include_logp})")


REGULARIZERS = {cls.name: cls for cls in (KineticEnergy, JacobianFrobenius, TrajectoryPolynomial)}
