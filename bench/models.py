"""Networks the benchmark workloads integrate; built from a seed, so every library gets the same weights.

``ConcatMLP`` is FFJORD's concat-time MLP; ``ExactDivergenceCNF`` turns it into CNF dynamics on the
augmented state ``(z, logp)`` with the divergence computed exactly by one autograd pass per
dimension (the FFJORD setting for 2-D toy data).
"""

import math

import torch
from torch import nn

__all__ = ["ConcatMLP", "ExactDivergenceCNF", "HutchinsonCNF", "exact_divergence", "eight_gaussians",
           "standard_normal_logpdf"]


class ConcatMLP(nn.Module):
    """MLP on (B, widths[0]) inputs whose every layer also sees time: ``h <- act(W [h, t] + b)``.

    Args:
        widths: layer widths from input to output, e.g. (2, 64, 64, 64, 2).
        activation: module class applied between layers (not after the last).
    """

    def __init__(self, widths, activation=nn.Tanh):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(w_in + 1, w_out) for w_in, w_out in zip(widths[:-1], widths[1:]))
        self.activation = activation()

    def forward(self, t, z):
        """``t``: 0-dim time tensor; ``z``: (B, widths[0]). Returns (B, widths[-1])."""
        column = t.to(z.dtype).reshape(1, 1).expand(z.shape[0], 1)
        h = z
        for index, layer in enumerate(self.layers):
            h = layer(torch.cat([h, column], dim=1))
            if index < len(self.layers) - 1:
                h = self.activation(h)
        return h


def exact_divergence(dz, z, create_graph):
    """tr(d dz / d z) per sample: (B,) from ``dz`` and ``z`` of shape (B, D), one vjp per dimension."""
    columns = []
    for i in range(z.shape[1]):
        grad = torch.autograd.grad(dz[:, i].sum(), z, retain_graph=True, create_graph=create_graph)[0]
        columns.append(grad[:, i])
    return torch.stack(columns, dim=1).sum(dim=1)


class ExactDivergenceCNF(nn.Module):
    """CNF dynamics on ``(z, logp)``: dz/dt = net(t, z), dlogp/dt = -tr(d net / d z).

    ``z`` is (B, D) and ``logp`` (B, 1). Outside autograd the divergence graph is not kept
    (inference); under autograd it is, so the loss can be backpropagated through the solver.
    """

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, t, state):
        z, _ = state
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if z.grad_fn is None:  # a leaf (or a view made under no_grad): differentiate a fresh copy
                z = z.detach().requires_grad_(True)
            dz = self.net(t, z)
            divergence = self.divergence(dz, z, keep_graph)
        if not keep_graph:
            dz, divergence = dz.detach(), divergence.detach()
        return dz, -divergence[:, None]

    def divergence(self, dz, z, keep_graph):
        """tr(d dz / d z) per sample (B,)."""
        return exact_divergence(dz, z, keep_graph)


class HutchinsonCNF(ExactDivergenceCNF):
    """Like ``ExactDivergenceCNF`` with FFJORD's Hutchinson estimate eps^T (d net / d z) eps.

    ``noise`` (B, D) is fixed (drawn once from the workload's seed), as an estimator must be
    during one solve and its adjoint.
    """

    def __init__(self, net, noise):
        super().__init__(net)
        self.register_buffer("noise", noise)

    def divergence(self, dz, z, keep_graph):
        (vjp,) = torch.autograd.grad(dz, z, self.noise, create_graph=keep_graph)
        return (vjp * self.noise).sum(dim=1)


def eight_gaussians(count, generator, dtype=torch.float32):
    """(count, 2) samples of FFJORD's 8-Gaussians toy density (centres on a circle of radius 2)."""
    angles = torch.randint(0, 8, (count,), generator=generator).to(dtype) * (math.pi / 4)
    centres = 2.0 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return centres + 0.1 * torch.randn(count, 2, generator=generator, dtype=dtype)


def standard_normal_logpdf(z):
    """log N(z; 0, I) summed over the last dimension: (B,) from (B, D)."""
    return -0.5 * (z ** 2).sum(dim=-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)
