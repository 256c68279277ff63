"""Divergence estimators against the exact Jacobian trace, in float64."""

import sys
import types

import pytest
import torch

from fastcnf.cnf.divergence import (
    ESTIMATORS,
    ExactDivergence,
    FiniteDifferenceDivergence,
    HutchinsonDivergence,
    make_estimator,
)
from fastcnf.kernels.tangent_mlp import mlp_reference
from fastcnf.cnf.nets import ODEnet

DIM = 3


def _net(layer="concatsquash"):
    torch.manual_seed(1)
    return ODEnet(DIM, (16, 16), layer, "tanh").double()


def _jacobians(net, t, z):
    """(B, D, D) per-sample Jacobians by torch.autograd.functional."""
    return torch.stack([torch.autograd.functional.jacobian(lambda row: net(t, row[None])[0], row) for row in z])


def _point_cloud(num, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num, DIM, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("fused", ["auto", False])
def test_exact_divergence_and_frobenius_match_the_jacobian(fused):
    net, t, z = _net(), torch.tensor(0.4, dtype=torch.float64), _point_cloud(6)
    estimate = ExactDivergence(fused)(net, t, z, frobenius=True)
    jacobians = _jacobians(net, t, z)
    torch.testing.assert_close(estimate.divergence, jacobians.diagonal(dim1=1, dim2=2).sum(1))
    torch.testing.assert_close(estimate.frobenius, jacobians.pow(2).sum((1, 2)))
    torch.testing.assert_close(estimate.f, net(t, z))


@pytest.mark.parametrize("name", ["hutchinson-gaussian", "hutchinson-rademacher", "fd-gaussian", "fd-rademacher"])
def test_stochastic_estimators_average_to_the_exact_divergence(name):
    net, t = _net(), torch.tensor(0.4, dtype=torch.float64)
    point = _point_cloud(1)
    jacobian = _jacobians(net, t, point)[0]
    z = point.expand(20000, DIM).clone()  # one point, 20000 independent noise draws
    estimator = make_estimator(name)
    torch.manual_seed(3)
    estimator.resample(z)
    estimate = estimator(net, t, z, frobenius=True)
    for values, exact in ((estimate.divergence, jacobian.trace()), (estimate.frobenius, jacobian.pow(2).sum())):
        standard_error = values.std() / values.numel() ** 0.5
        assert abs(values.mean() - exact) < 5 * standard_error + 1e-6
        assert standard_error < 0.05 * abs(exact) + 1e-3  # the check above is not vacuous


def test_rademacher_is_exact_for_diagonal_jacobians():
    scale = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    z = _point_cloud(4)
    estimator = HutchinsonDivergence("rademacher")
    estimator.resample(z)
    estimate = estimator(lambda t, x: x * scale, 0.0, z)
    torch.testing.assert_close(estimate.divergence, torch.full((4,), 1.5, dtype=torch.float64))


def test_noise_is_fixed_until_resampled():
    net, t, z = _net(), torch.tensor(0.1, dtype=torch.float64), _point_cloud(5)
    estimator = HutchinsonDivergence()
    estimator.resample(z)
    first = estimator(net, t, z).divergence
    torch.testing.assert_close(estimator(net, t, z).divergence, first, rtol=0, atol=0)
    estimator.resample(z)
    assert not torch.allclose(estimator(net, t, z).divergence, first)


def test_estimators_without_noise_for_the_state_fail_clearly():
    z = _point_cloud(5)
    with pytest.raises(RuntimeError, match=r"call resample\(z\)"):
        HutchinsonDivergence()(_net(), 0.0, z)
    estimator = FiniteDifferenceDivergence()
    estimator.resample(z[:2])
    with pytest.raises(RuntimeError, match=r"shape \(5, 3\)"):
        estimator(_net(), 0.0, z)


@pytest.mark.parametrize("fused", ["auto", False])
@pytest.mark.parametrize("name", ["exact", "hutchinson-gaussian"])
def test_divergence_is_differentiable_in_the_state(name, fused):
    net, t = _net(), torch.tensor(0.2, dtype=torch.float64)
    z = _point_cloud(3).requires_grad_(True)
    estimator = make_estimator(name, fused=fused)
    estimator.resample(z)
    assert torch.autograd.gradcheck(lambda x: estimator(net, t, x, frobenius=True).divergence, (z,))
    assert torch.autograd.gradcheck(lambda x: estimator(net, t, x, frobenius=True).frobenius, (z,))


def test_finite_differences_match_hutchinson_for_the_same_noise():
    net, t, z = _net(), torch.tensor(0.2, dtype=torch.float64), _point_cloud(7)
    hutchinson, differences = HutchinsonDivergence(), FiniteDifferenceDivergence()
    hutchinson.resample(z)
    differences.noise = hutchinson.noise
    torch.testing.assert_close(differences(net, t, z).divergence, hutchinson(net, t, z).divergence,
                               rtol=1e-8, atol=1e-8)


def test_no_graph_is_kept_when_gradients_are_off():
    net, z = _net(), _point_cloud(4)
    for name in ESTIMATORS:
        estimator = make_estimator(name)
        estimator.resample(z)
        with torch.no_grad():
            estimate = estimator(net, 0.3, z, frobenius=True)
        assert not estimate.f.requires_grad and not estimate.divergence.requires_grad


def _fake_kernel(calls, supported=True):
    """A stand-in for fastcnf.kernels.hutchinson computing (f, eps^T J eps) by the reference MLP."""

    def hutchinson_mlp(spec, t, z, eps):
        calls.append(spec)
        with torch.enable_grad():
            z_in = z.detach().requires_grad_(True)
            f = mlp_reference(spec, t, z_in)
            (vjp,) = torch.autograd.grad(f, z_in, eps)
        return f.detach(), (vjp * eps).sum(1)

    module = types.ModuleType("fastcnf.kernels.hutchinson")
    module.hutchinson_mlp = hutchinson_mlp
    module.supports = lambda spec, device: supported
    return module


def test_fused_kernel_is_used_by_name_when_it_supports_the_net(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "fastcnf.kernels.hutchinson", _fake_kernel(calls))
    monkeypatch.setenv("FASTCNF_BACKEND", "triton")  # the kernel runs on the Triton backend only
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    net, t, z = _net("concat"), torch.tensor(0.3, dtype=torch.float64), _point_cloud(6)
    fused, reference = HutchinsonDivergence(fused_kernel=True), HutchinsonDivergence(fused_kernel=False)
    fused.resample(z)
    reference.noise = fused.noise
    with torch.no_grad():
        got, expected = fused(net, t, z), reference(net, t, z)
    assert len(calls) == 1
    torch.testing.assert_close(got.divergence, expected.divergence)
    torch.testing.assert_close(got.f, expected.f)
    fused(net, t, z, frobenius=True)  # the kernel has no Frobenius estimate: autograd path
    auto = HutchinsonDivergence()  # default: CUDA only, so not on these CPU tensors
    auto.noise = fused.noise
    auto(net, t, z)
    fused(lambda t, x: net(t, x), t, z)  # no mlp_spec: autograd
    assert len(calls) == 1
    fused(_net("concatsquash"), t, z)  # every ODEnet describes itself as affine layers
    assert len(calls) == 2 and calls[1].time_concat == "none"


def test_fused_kernel_falls_back_when_unsupported(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "fastcnf.kernels.hutchinson", _fake_kernel(calls, supported=False))
    estimator = HutchinsonDivergence(fused_kernel=True)
    z = _point_cloud(3)
    estimator.resample(z)
    estimator(_net("concat"), 0.1, z)
    assert calls == []


def test_unknown_names_and_options_are_rejected():
    with pytest.raises(ValueError, match="unknown divergence estimator 'trace'"):
        make_estimator("trace")
    with pytest.raises(ValueError, match="unknown noise 'uniform'"):
        HutchinsonDivergence("uniform")
    with pytest.raises(ValueError, match="step must be positive"):
        FiniteDifferenceDivergence(step=0.0)
    with pytest.raises(ValueError, match="fused_kernel"):
        HutchinsonDivergence(fused_kernel="yes")
    with pytest.raises(ValueError, match="fused must be 'auto', True or False"):
        ExactDivergence(fused="yes")


@pytest.mark.parametrize("name", ["exact", "hutchinson-gaussian"])
def test_adjoint_forward_from_an_input_that_requires_grad(name):
    """Regression: the autograd path once differentiated a view made under no_grad (the adjoint's forward
    solve of a state that requires grad), got zeros for the divergence and a wrong solve."""
    from fastcnf.cnf import CNF, SolverSettings

    values = []
    for requires_grad in (False, True):
        torch.manual_seed(4)
        cnf = CNF(_net(), 0.5, make_estimator(name, fused=False), train_solver=SolverSettings("dopri5", 1e-8, 1e-8))
        x = _point_cloud(8).requires_grad_(requires_grad)
        values.append(cnf.log_prob(x).detach())
    torch.testing.assert_close(values[1], values[0], rtol=1e-12, atol=1e-12)
