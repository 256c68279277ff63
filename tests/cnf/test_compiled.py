"""The torch.compile'd fused pass (``compile=True``): a CNF solved through odeint_adjoint or trained by
backprop through the solver gives the eager pass's loss, gradients and evaluation counts; a failing
compiler falls back to the eager pass with one warning; the training settings accept ``--compile`` where
the fused pass runs and refuse it elsewhere."""

import warnings

import pytest
import torch

import fastcnf
from fastcnf.cnf import CNF, ODEnet, SolverSettings
from fastcnf.cnf import compiled as compiled_module
from fastcnf.cnf import divergence as divergence_module
from fastcnf.cnf.divergence import ExactDivergence, HutchinsonDivergence
from fastcnf.kernels import tangent_mlp
from fastcnf.training.cli import build_parser
from fastcnf.training.config import ConfigError, TrainConfig


def _training_step(estimator, seed=0, adjoint=True):
    torch.manual_seed(seed)
    net = ODEnet(2, (8, 8), "concatsquash", "tanh")
    cnf = CNF(net, 0.5, estimator, train_solver=SolverSettings("dopri5", 1e-5, 1e-5, adjoint=adjoint))
    x = torch.randn(16, 2)
    torch.manual_seed(seed + 1)  # the Hutchinson noise
    with fastcnf.track() as stats:
        loss = -cnf.log_prob(x).mean()
        grads = torch.autograd.grad(loss, list(net.parameters()))
    return loss.detach(), grads, (stats.nfe_forward, stats.nfe_backward)


@pytest.mark.parametrize("estimator", [ExactDivergence, HutchinsonDivergence])
def test_the_compiled_pass_trains_like_the_eager_pass(monkeypatch, estimator):
    calls = []
    for name in ("COMPILED_VALUES", "COMPILED_VJP"):
        monkeypatch.setattr(f"fastcnf.cnf.divergence.{name}", _Counting(getattr(divergence_module, name), name, calls))
    with warnings.catch_warnings():
        warnings.simplefilter("error", compiled_module.CompileWarning)  # the compiler must work here
        loss, grads, nfe = _training_step(estimator(compile=True))
    assert {"COMPILED_VALUES", "COMPILED_VJP"} <= set(calls)  # both the forward and the adjoint steps ran compiled
    assert calls.count("COMPILED_VJP") == nfe[1]
    expected_loss, expected_grads, expected_nfe = _training_step(estimator(compile=False))
    assert nfe == expected_nfe
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
    for got, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("estimator", [ExactDivergence, HutchinsonDivergence])
def test_backprop_through_the_compiled_pass_trains_like_the_eager_pass(monkeypatch, estimator):
    """Backprop through a solve: every evaluation is one OdenetPass node whose forward and backward run
    compiled, with the eager pass's loss, gradients and evaluation count."""
    calls = []
    for name in ("COMPILED_FORWARD", "COMPILED_BACKWARD"):
        monkeypatch.setattr(f"fastcnf.cnf.divergence.{name}", _Counting(getattr(divergence_module, name), name, calls))
    with warnings.catch_warnings():
        warnings.simplefilter("error", compiled_module.CompileWarning)
        loss, grads, nfe = _training_step(estimator(compile=True), adjoint=False)
    assert calls.count("COMPILED_FORWARD") == nfe[0] and nfe[1] == 0
    assert 0 < calls.count("COMPILED_BACKWARD") < nfe[0]  # the stages of rejected steps get no gradient
    expected_loss, expected_grads, expected_nfe = _training_step(estimator(compile=False), adjoint=False)
    assert nfe == expected_nfe
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
    for got, expected in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


class _Counting:
    def __init__(self, compiled, name, calls):
        self.compiled, self.name, self.calls = compiled, name, calls

    def __call__(self, *args):
        self.calls.append(self.name)
        return self.compiled(*args)


def test_a_failing_compiler_falls_back_to_the_eager_pass_with_one_warning(monkeypatch):
    def broken(function, dynamic=None):
        def run(*args):
            raise RuntimeError("no C++ compiler\nmore lines")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    compiled = compiled_module.CompiledPass(tangent_mlp.tangent_values)
    torch.manual_seed(0)
    weights, biases = [torch.randn(5, 2), torch.randn(2, 5)], [torch.randn(5), torch.randn(2)]
    z = torch.randn(4, 2)
    with pytest.warns(compiled_module.CompileWarning, match=r"tangent_values failed \(RuntimeError: no C\+\+ "
                                                            r"compiler\); it runs eagerly"):
        f, trace = compiled(weights, biases, "tanh", z)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = compiled(weights, biases, "tanh", z)  # no second warning, no second attempt
    expected = tangent_mlp.tangent_values(weights, biases, "tanh", z)
    for got in (f, trace), again:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_inputs_differing_only_in_requires_grad_or_strides_share_one_compilation(monkeypatch):
    """The state of a solve's first stage does not require grad and later ones do, and a cotangent may be a
    strided view: torch.compile guards on both, so without canonical inputs each would compile its own
    variant (and enough of them exhaust its recompile limit, after which the pass runs eagerly)."""
    graphs = []
    original = torch.compile

    def counting(function, dynamic=None):
        def backend(graph, example_inputs):
            graphs.append(graph)
            return graph.forward
        return original(function, dynamic=dynamic, backend=backend)

    def affine(x, y):
        return x * 2 + y

    monkeypatch.setattr(torch, "compile", counting)
    compiled = compiled_module.CompiledPass(affine)
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    results = [compiled(x, y), compiled(x.clone().requires_grad_(), y), compiled(x, y.t().contiguous().t())]
    assert len(graphs) == 1
    for result in results:
        torch.testing.assert_close(result, affine(x, y), rtol=0, atol=0)
        assert not result.requires_grad


def test_training_settings_take_compile_where_the_fused_pass_runs():
    args = build_parser().parse_args(["train", "--compile", "--divergence", "exact"])
    assert args.compile is True and TrainConfig(compile=True, divergence="exact").compile
    assert "compile" not in vars(build_parser().parse_args(["train"]))  # the default comes from TrainConfig
    for changes in ({"divergence": "fd-gaussian"}, {"method": "jko"}):
        with pytest.raises(ConfigError, match="compile needs the exact or a Hutchinson divergence"):
            TrainConfig(compile=True, **changes)
    with pytest.raises(ValueError, match="compile must be True or False"):
        ExactDivergence(compile="yes")
