"""The fused divergence pass of the exact and Hutchinson estimators for ODEnet (every layer kind and
activation) against the autograd reference estimators, float64 finite differences (gradcheck, with t),
whole CNF solves under odeint_adjoint and plain backpropagation, and the adjoint's backward steps by the
fused pass's own vector-Jacobian product."""

import pytest
import torch

import fastcnf
from fastcnf.cnf import CNF, JKOFlow, KineticEnergy, SolverSettings, TerminalTime, TrajectoryPolynomial
from fastcnf.cnf.flow import CNFDynamics
from fastcnf.cnf import divergence as divergence_module
from fastcnf.cnf.divergence import ExactDivergence, HutchinsonDivergence, OdenetPass
from fastcnf.cnf.nets import ODEnet
from fastcnf.kernels import tangent_mlp

LAYERS = ["concat", "concatsquash", "ignore", ("concatsquash", "concat", "ignore")]
ACTIVATIONS = ["tanh", "softplus", "swish", "elu"]
F64 = torch.float64


def _net(layers, activation, dim=3, seed=0):
    torch.manual_seed(seed)
    net = ODEnet(dim, (7, 5), layers, activation).double()
    with torch.no_grad():
        for parameter in net.parameters():  # larger weights: the activations' curved parts matter
            parameter.mul_(2.0)
    return net


def _state(batch=4, dim=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=generator, dtype=F64)


def _estimators(kind):
    """(fused, autograd reference) estimators sharing their noise."""
    if kind == "exact":
        return ExactDivergence(fused=True), ExactDivergence(fused=False)
    fused, reference = HutchinsonDivergence(fused=True), HutchinsonDivergence(fused=False)
    torch.manual_seed(2)
    fused.resample(_state())
    reference.noise = fused.noise
    return fused, reference


class _Evaluation(torch.nn.Module):
    """(f, divergence) of ``estimator`` on ``net`` as a module, so gradcheck can vary the net's parameters
    through ``torch.func.functional_call``."""

    def __init__(self, net, estimator):
        super().__init__()
        self.net, self.estimator = net, estimator

    def forward(self, t, z):
        estimate = self.estimator(self.net, t, z)
        return estimate.f, estimate.divergence


@pytest.mark.parametrize("kind", ["exact", "hutchinson"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layers", LAYERS)
def test_fused_estimate_and_gradients_equal_the_autograd_reference(layers, activation, kind):
    net = _net(layers, activation)
    fused, reference = _estimators(kind)
    results = []
    for estimator in (fused, reference):
        z = _state().requires_grad_()
        t = torch.tensor(0.35, dtype=F64, requires_grad=True)
        estimate = estimator(net, t, z)
        loss = (estimate.f * torch.linspace(-1, 1, 3, dtype=F64)).sum() + (estimate.divergence ** 2).sum()
        grads = torch.autograd.grad(loss, [z, t, *net.parameters()], allow_unused=True)
        results.append((estimate.f, estimate.divergence, grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-12, atol=1e-12)
    for got, expected in zip(results[0][2], results[1][2]):
        if expected is None:  # t does not reach an ignore-only net
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["exact", "hutchinson"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layers", LAYERS)
def test_fused_gradcheck_in_the_state_time_and_parameters(layers, activation, kind):
    net = _net(layers, activation)
    fused, _ = _estimators(kind)
    evaluation = _Evaluation(net, fused)
    names = [name for name, _ in evaluation.named_parameters()]
    params = [parameter.detach().clone().requires_grad_() for parameter in evaluation.parameters()]
    z = _state().requires_grad_()
    t = torch.tensor(0.35, dtype=F64, requires_grad=True)

    def evaluate(t, z, *values):
        return torch.func.functional_call(evaluation, dict(zip(names, values)), (t, z))

    assert torch.autograd.gradcheck(evaluate, (t, z, *params))


def test_the_fused_pass_is_taken_and_keeps_no_graph_without_gradients(monkeypatch):
    calls = []
    original = tangent_mlp.tangent_forward
    monkeypatch.setattr(tangent_mlp, "tangent_forward",
                        lambda *args, **kwargs: calls.append(args[3].shape) or original(*args, **kwargs))
    net, z = _net("concatsquash", "tanh"), _state()
    hutchinson = HutchinsonDivergence()
    hutchinson.resample(z)
    with torch.no_grad():
        exact = ExactDivergence()(net, 0.2, z, frobenius=True)
        estimate = hutchinson(net, 0.2, z)
    assert len(calls) == 2 and not exact.f.requires_grad and not estimate.divergence.requires_grad
    hutchinson(net, 0.2, z, frobenius=True)  # |eps^T J|^2 is the autograd path's estimator
    ExactDivergence()(lambda t, x: net(t, x), 0.2, z)  # no mlp_spec: autograd
    assert len(calls) == 2


def test_exact_frobenius_of_the_fused_pass_is_the_jacobians():
    net, z = _net("concat", "swish"), _state()
    got = ExactDivergence(fused=True)(net, 0.4, z, frobenius=True)
    expected = ExactDivergence(fused=False)(net, 0.4, z, frobenius=True)
    torch.testing.assert_close(got.frobenius, expected.frobenius, rtol=1e-12, atol=1e-12)


def test_fused_true_needs_a_network_that_describes_itself():
    net, z = _net("concat", "tanh"), _state()
    with pytest.raises(ValueError, match=r"ExactDivergence\(fused=True\) needs a network with mlp_spec\(t\)"):
        ExactDivergence(fused=True)(lambda t, x: net(t, x), 0.0, z)
    with pytest.raises(ValueError, match="float32/float64 state"):
        ExactDivergence(fused=True)(net, 0.0, z[None])


def _cnf_gradients(estimator, adjoint, layers="concatsquash"):
    torch.manual_seed(0)
    net = ODEnet(2, (16, 16), layers, "softplus").double()
    solver = SolverSettings("dopri5", 1e-9, 1e-9, adjoint=adjoint)
    cnf = CNF(net, TerminalTime(0.7), estimator, train_solver=solver)
    x = _state(32, 2, seed=5).requires_grad_()
    estimator.resample(x)
    loss = -cnf.log_prob(x).mean()
    grads = torch.autograd.grad(loss, [x, *cnf.parameters()])
    return loss.detach(), grads


@pytest.mark.parametrize("adjoint", [True, False], ids=["adjoint", "backprop"])
@pytest.mark.parametrize("kind", ["exact", "hutchinson"])
def test_cnf_training_gradients_equal_the_autograd_path(kind, adjoint):
    """A CNF with a trainable end time: loss and the gradients for x, every weight and T agree between
    the fused and the autograd estimators, through odeint_adjoint and through the solver."""
    fused, reference = _estimators(kind)
    if kind == "hutchinson":  # the CNF draws the noise for its own batch: the same seed for both
        torch.manual_seed(3)
        fused, reference = HutchinsonDivergence(fused=True), HutchinsonDivergence(fused=False)
        reference.resample = lambda z: setattr(reference, "noise", fused.noise)
    loss, grads = _cnf_gradients(fused, adjoint)
    expected_loss, expected_grads = _cnf_gradients(reference, adjoint)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=1e-10)
    for got, expected in zip(grads, expected_grads):
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("adjoint", [True, False], ids=["adjoint", "backprop"])
def test_a_solve_looks_the_parameters_up_once_and_keeps_nothing_after_it(monkeypatch, adjoint):
    """Within a CNF solve the evaluations share one lookup of the net's parameters (and, under backprop, one
    concatenation node); afterwards the estimator holds nothing, so a parameter changed between solves
    without autograd's knowledge (through ``.data``) is seen by the next solve."""
    lookups = []
    original = divergence_module._odenet_inputs
    monkeypatch.setattr(divergence_module, "_odenet_inputs", lambda *args: lookups.append(1) or original(*args))
    torch.manual_seed(0)
    net = ODEnet(2, (16, 16), "concatsquash", "tanh").double()
    estimator = ExactDivergence()
    cnf = CNF(net, 0.5, estimator, train_solver=SolverSettings("dopri5", 1e-6, 1e-6, adjoint=adjoint))
    x = _state(32, 2, seed=5)
    with fastcnf.track() as stats:
        loss = -cnf.log_prob(x).mean()
    assert stats.nfe_forward > 10 and len(lookups) == 1 and estimator.solve_inputs is None
    loss.backward()
    next(net.parameters()).data.mul_(1.5)  # no version change, no autograd record
    changed = cnf.log_prob(x)
    expected = CNF(net, 0.5, ExactDivergence(fused=False),
                   train_solver=SolverSettings("dopri5", 1e-6, 1e-6, adjoint=adjoint)).log_prob(x)
    torch.testing.assert_close(changed, expected, rtol=1e-9, atol=1e-9)


def test_jko_flow_blocks_use_the_fused_pass(monkeypatch):
    calls = []
    original = tangent_mlp.tangent_forward
    monkeypatch.setattr(tangent_mlp, "tangent_forward",
                        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    flow = JKOFlow(ODEnet(2, (8,), "concatsquash", "softplus").double(), 0.5, divergence="hutchinson-rademacher",
                   test_divergence="exact")
    flow.eval().log_prob(_state(6, 2))
    assert calls


def _adjoint_cnf_gradients(estimator, layers, regularizers=()):
    """Loss, gradients for x, every weight and T, and the backward evaluation count of a float64 CNF
    under odeint_adjoint (a TPR regularizer adds output times)."""
    torch.manual_seed(0)
    net = ODEnet(2, (16, 16), layers, "softplus").double()
    cnf = CNF(net, TerminalTime(0.7), estimator, regularizers=regularizers,
              train_solver=SolverSettings("dopri5", 1e-8, 1e-8, adjoint=True))
    x = _state(32, 2, seed=5).requires_grad_()
    torch.manual_seed(3)
    with fastcnf.track() as stats:
        loss = -cnf.log_prob(x).mean() + cnf.regularization()
        grads = torch.autograd.grad(loss, [x, *cnf.parameters()])
    return loss.detach(), grads, stats.nfe_backward


@pytest.mark.parametrize("regularizers", [(), "kinetic", "tpr"])
@pytest.mark.parametrize("kind", ["exact", "hutchinson"])
@pytest.mark.parametrize("layers", LAYERS)
def test_adjoint_steps_take_the_fused_vector_jacobian_without_autograd(monkeypatch, layers, kind, regularizers):
    """Every backward evaluation of odeint_adjoint takes the fused pass's own vector-Jacobian product
    (no OdenetPass graph node is differentiated), with the gradients and evaluation counts of the autograd
    path over the same fused pass; a state regularizer (kinetic energy) leaves it to autograd."""
    regs = {(): (), "kinetic": (KineticEnergy(0.1),), "tpr": (TrajectoryPolynomial(0.5),)}[regularizers]
    estimator = ExactDivergence if kind == "exact" else HutchinsonDivergence
    calls = {"direct": 0, "graph": 0}
    direct, graph = estimator.vector_jacobian, OdenetPass.backward
    monkeypatch.setattr(estimator, "vector_jacobian",
                        lambda *args: calls.__setitem__("direct", calls["direct"] + 1) or direct(*args))
    monkeypatch.setattr(OdenetPass, "backward", staticmethod(
        lambda *args: calls.__setitem__("graph", calls["graph"] + 1) or graph(*args)))
    loss, grads, nfe = _adjoint_cnf_gradients(estimator(), layers, regs)
    assert (calls["direct"], calls["graph"]) == ((0, nfe) if regularizers == "kinetic" else (nfe, 0))
    monkeypatch.setattr(CNFDynamics, "adjoint_vjp", lambda *args: None)  # autograd over the same fused pass
    expected_loss, expected_grads, expected_nfe = _adjoint_cnf_gradients(estimator(), layers, regs)
    assert nfe == expected_nfe
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def _dynamics_gradients(dynamics, params, z0):
    """Gradients for ``params`` of a float64 CNF solve through odeint_adjoint with those adjoint params."""
    state = (z0, torch.zeros(z0.shape[0], 1, dtype=torch.float64))
    dynamics.estimator.resample(z0)
    z, logp = fastcnf.odeint_adjoint(dynamics, state, torch.tensor([0.0, 0.6], dtype=torch.float64),
                                     rtol=1e-8, atol=1e-8, adjoint_params=params)
    loss = (z[-1].square().sum(dim=1) + logp[-1, :, 0]).mean()
    return torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("kind", ["exact", "hutchinson"])
def test_adjoint_parameters_in_another_order_or_outside_the_net(monkeypatch, kind):
    """The fused adjoint step maps its gradients onto adjoint params that are not the net's own parameters
    in order (reversed, with one outside the net): the gradients of the autograd path over the same pass."""
    torch.manual_seed(0)
    estimator = ExactDivergence() if kind == "exact" else HutchinsonDivergence()
    dynamics = CNFDynamics(ODEnet(2, (16, 16), "concatsquash", "tanh").double(), estimator)
    outside = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    params = (outside, *reversed(list(dynamics.net.parameters())))
    z0 = _state(16, 2, seed=7)
    torch.manual_seed(5)
    got = _dynamics_gradients(dynamics, params, z0)
    monkeypatch.setattr(CNFDynamics, "adjoint_vjp", lambda *args: None)
    torch.manual_seed(5)
    expected = _dynamics_gradients(dynamics, params, z0)
    assert torch.equal(got[0], torch.zeros(3, dtype=torch.float64))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_a_replaced_parameter_is_seen_by_the_next_adjoint_solve():
    """The fused adjoint step looks the net's parameters up once per solve, not once per estimator: a weight
    replaced between two solves gets its gradient in the second."""
    torch.manual_seed(0)
    dynamics = CNFDynamics(ODEnet(2, (8,), "concatsquash", "tanh").double(), ExactDivergence())
    z0 = _state(8, 2, seed=2)
    _dynamics_gradients(dynamics, tuple(dynamics.net.parameters()), z0)
    layer = dynamics.net.layers[0].linear
    layer.weight = torch.nn.Parameter(layer.weight.detach() * 2)
    got = _dynamics_gradients(dynamics, tuple(dynamics.net.parameters()), z0)
    fresh = CNFDynamics(dynamics.net, ExactDivergence(fused=False))
    expected = _dynamics_gradients(fresh, tuple(fresh.net.parameters()), z0)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
