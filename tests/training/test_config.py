"""TrainConfig validation: every bad setting gets a ConfigError naming it."""

import pytest

from fastcnf.training.config import ConfigError, TrainConfig


def test_defaults_are_valid_and_round_trip_through_a_dict():
    config = TrainConfig()
    assert TrainConfig.from_dict(config.as_dict()) == config
    assert config.replace(hidden=[8, 8]).hidden == (8, 8)


@pytest.mark.parametrize("changes, message", [
    (dict(data="mnist"), "unknown dataset 'mnist'"),
    (dict(method="sgd"), "unknown method 'sgd'"),
    (dict(solver="rk45"), "unknown solver 'rk45'"),
    (dict(divergence="trace"), "unknown divergence 'trace'"),
    (dict(lr=0.0), "lr must be a positive finite number"),
    (dict(rtol=float("nan")), "rtol must be a positive finite number"),
    (dict(iterations=0), "iterations must be a positive integer"),
    (dict(batch_size=2.5), "batch_size must be a positive integer"),
    (dict(hidden=(64, 0)), "hidden width must be a positive integer"),
    (dict(kinetic=-1.0), "kinetic must be a finite number >= 0"),
    (dict(tpr_degree=0), "tpr_degree must be a positive integer"),
    (dict(tpr_degree=3), "tpr_times must be >= tpr_degree=3"),
    (dict(t_min=2.0, t_max=1.0), "need t_min < t_max"),
    (dict(method="toflow", end_time=9.0), r"end_time=9.0 must lie in \[t_min, t_max\]"),
    (dict(time_schedule="random"), "unknown time schedule 'random'"),
    (dict(time_momentum=1.0), "time_momentum must lie in"),
    (dict(time_momentum=-0.1), "time_momentum must be a finite number >= 0"),
    (dict(weight_steps=1, time_steps=2), "time_steps=2 cannot exceed weight_steps=1"),
    (dict(solver="rk4"), "solver 'rk4' is fixed-step: pass a step size"),
    (dict(step_size=0.1), "solver 'dopri5' chooses its own steps"),
    (dict(seed=-1), "seed must be a non-negative integer"),
    (dict(controller="pid"), "unknown controller 'pid'"),
    (dict(controller="pi", solver="rk4", step_size=0.1), "controller 'pi' needs an adaptive solver"),
])
def test_bad_settings_are_rejected(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes)


def test_end_time_default_depends_on_the_method():
    assert TrainConfig().end_time == 0.5  # FFJORD's toy setting
    assert TrainConfig(method="toflow").end_time == 1.0  # TO-FLOW starts at T = 1
    assert TrainConfig(method="toflow", end_time=0.7).end_time == 0.7
    assert TrainConfig(weight_steps=1, time_steps=2, time_schedule="alternate").time_steps == 2


def test_fixed_step_solver_with_step_size_and_unknown_keys():
    assert TrainConfig(solver="rk4", step_size=0.1, test_solver="rk4").step_size == 0.1
    with pytest.raises(ConfigError, match="unknown settings"):
        TrainConfig.from_dict({"learning_rate": 1.0})


def test_learning_rate_defaults_per_method_and_jko_defaults_follow_the_authors_code():
    assert TrainConfig().lr == 1e-3
    jko = TrainConfig(method="jko")
    assert jko.lr == 1e-4 and jko.jko_clip == 1.0 and (jko.jko_h0, jko.jko_rho, jko.jko_max_blocks) == (0.25, 1.4, 8)
    assert jko.adjoint and jko.jko_eta == 0.5 and jko.jko_block_time == "interval"
    assert TrainConfig(method="jko", lr=3e-3).lr == 3e-3
    assert TrainConfig.from_dict(jko.as_dict()) == jko
