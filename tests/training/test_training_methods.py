"""Training methods: the models and optimizations they build and the losses they return."""

import pytest
import torch

from fastcnf.cnf import SequentialFlow
from fastcnf.cnf.regularizers import JacobianFrobenius, KineticEnergy, TrajectoryPolynomial
from fastcnf.cnf.toflow import CoordinateDescent, TerminalTime
from fastcnf.training.config import TrainConfig
from fastcnf.training.registry import TRAINING_METHODS
from fastcnf.training.training_methods import OptimizerStep, resolve_divergence

SMALL = dict(hidden=(8,), rtol=1e-3, atol=1e-3, blocks=2)


def _build(method, **changes):
    config = TrainConfig(method=method, **{**SMALL, **changes})
    model = TRAINING_METHODS[method]().build_model(config, 2)
    return config, model


def _regularizer_types(model):
    return [type(r) for r in model.blocks[0].regularizers]


def test_method_defaults():
    assert _regularizer_types(_build("ffjord")[1]) == []
    assert _regularizer_types(_build("rnode")[1]) == [KineticEnergy, JacobianFrobenius]
    assert _regularizer_types(_build("tpr")[1]) == [TrajectoryPolynomial]
    assert _build("tpr")[1].blocks[0].regularizers[0].weight == 5.0
    assert all(isinstance(block.terminal_time, TerminalTime) for block in _build("toflow")[1].blocks)
    assert all(block.terminal_time is None for block in _build("ffjord")[1].blocks)
    assert [_build(name)[0].end_time for name in ("ffjord", "toflow")] == [0.5, 1.0]
    config = _build("toflow")[0]
    assert (config.time_schedule, config.weight_steps, config.time_steps) == ("joint", 1, 1)
    assert (config.t_min, config.t_max) == (0.1, 1.9)
    optimization = TRAINING_METHODS["toflow"]().build_optimization(_build("toflow")[1], config)
    assert isinstance(optimization.time_optimizer, torch.optim.SGD)
    assert optimization.time_optimizer.defaults["momentum"] == config.time_momentum == 0.9


def test_tpr_settings_reach_the_regularizer_from_the_config_and_the_cli():
    from fastcnf.training.cli import build_parser

    (reg,) = _build("tpr")[1].blocks[0].regularizers
    assert (reg.weight, reg.degree, reg.num_times, reg.include_logp) == (5.0, 1, 2, False)  # the paper's
    args = vars(build_parser().parse_args(["train", "--method", "tpr", "--tpr-weight", "1.5", "--tpr-degree", "3",
                                           "--tpr-times", "4", "--tpr-logp", "--hidden", "8", "--rtol", "1e-3",
                                           "--atol", "1e-3"]))
    args.pop("command")
    config = TrainConfig(**args)
    (reg,) = TRAINING_METHODS["tpr"]().build_model(config, 2).blocks[0].regularizers
    assert (reg.weight, reg.degree, reg.num_times, reg.include_logp) == (1.5, 3, 4, True)


def test_explicit_weights_combine_with_any_method():
    _, model = _build("toflow", tpr_weight=2.0, kinetic=0.1)
    assert _regularizer_types(model) == [KineticEnergy, TrajectoryPolynomial]
    _, model = _build("rnode", jacobian=0.0)
    assert _regularizer_types(model) == [KineticEnergy]


def test_model_uses_config_settings():
    config, model = _build("ffjord", seminorm=True, test_rtol=1e-6, divergence="hutchinson-rademacher")
    assert isinstance(model, SequentialFlow) and len(model.blocks) == 2
    block = model.blocks[0]
    assert block.train_solver.rtol == 1e-3 and block.test_solver.rtol == 1e-6 and block.test_solver.atol == 1e-3
    assert block.train_solver.adjoint_options == {"norm": "seminorm"}
    assert block.train_estimator.name == "hutchinson-rademacher" and block.test_estimator.name == "exact"


def test_pi_controller_drives_the_forward_training_solve_only():
    """controller='pi': the forward training solve takes it; the adjoint solve (adjoint_options without it) and
    evaluation keep torchdiffeq's integral controller."""
    block = _build("ffjord", controller="pi")[1].blocks[0]
    assert block.train_solver.options == {"controller": "pi"} and block.train_solver.adjoint_options == {}
    assert block.test_solver.options == {}
    block = _build("ffjord", controller="pi", seminorm=True)[1].blocks[0]
    assert block.train_solver.adjoint_options == {"norm": "seminorm"}
    assert _build("ffjord")[1].blocks[0].train_solver.options == {}


def test_auto_divergence():
    assert resolve_divergence("auto", 2) == "exact"
    assert resolve_divergence("auto", 64) == "hutchinson-gaussian"
    assert resolve_divergence("auto", 8, test=True, train_name="hutchinson-gaussian") == "exact"
    assert resolve_divergence("auto", 64, test=True, train_name="fd-gaussian") == "fd-gaussian"


@pytest.mark.parametrize("method", sorted(set(TRAINING_METHODS) - {"jko"}))  # block-wise jko: tests/test_jko*.py
def test_loss_and_one_optimization_step(method):
    torch.manual_seed(0)
    config, model = _build(method, time_schedule="alternate", time_steps=1, weight_steps=1)
    method_object = TRAINING_METHODS[method]()
    optimization = method_object.build_optimization(model, config)
    expected = CoordinateDescent if method == "toflow" else OptimizerStep
    assert isinstance(optimization, expected)
    batch = torch.randn(32, 2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for iteration in range(2):  # toflow: a weight phase, then a time phase
        phase = optimization.begin(iteration)
        loss, metrics = method_object.loss(model, batch)
        loss.backward()
        optimization.step()
        assert torch.isfinite(loss)
        assert metrics["nll"] + metrics["regularization"] == pytest.approx(loss.item(), rel=1e-6)
        # two blocks of T = 0.5 (toflow: T starts at 1 and moves by at most lr * |dL/dT|)
        assert metrics["end_time"] == pytest.approx(2.0 if method == "toflow" else 1.0, rel=0.1)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any("net" in name for name in changed)
    assert any("terminal_time" in name for name in changed) == (method == "toflow")
    if method == "toflow":
        assert phase == "time"
