"""bench/reproduce/toflow.py: the TO-FLOW protocol's arms and budget, its two stages (the fixed-T
control trained after the other arms at their final T), and the report's time-to-quality reading."""

import json

import numpy as np
import pytest

from bench.reproduce import toflow
from bench.reproduce.harness import arm_config
from bench.reproduce.report import Run


def test_default_protocol_is_an_equal_cpu_time_budget_over_every_arm():
    protocol = toflow.build_protocol(toflow.parse_args([]))
    assert (protocol.budget.seconds, protocol.budget.clock, protocol.budget.validations) == (600.0, "thread", 40)
    assert protocol.budget.iterations is None and protocol.seeds == (0, 1, 2)
    names = [arm.name for arm in protocol.arms if arm.dataset == "8gaussians"]
    assert names == ["ffjord-T0.5", "ffjord-T1", "toflow-a0.1", "toflow-a0.3", "toflow-a0.1-alt4", "toflow-a0.3-alt4",
                     "toflow-a0.1-rnode", "toflow-a0.1-tpr"]
    assert {arm.dataset for arm in protocol.arms} == {"8gaussians", "checkerboard"}
    configs = {arm.name: arm_config(protocol, arm, 0, "out") for arm in protocol.arms if arm.dataset == "checkerboard"}
    for name, config in configs.items():
        assert (config.hidden, config.layer, config.activation, config.batch_size) == ((64, 64, 64), "concatsquash",
                                                                                       "tanh", 512)
        assert config.rtol == config.atol == config.test_rtol == 1e-5
        if name.startswith("toflow"):
            assert (config.method, config.end_time, config.t_min, config.t_max) == ("toflow", 1.0, 0.1, 1.9)
    assert [configs["ffjord-T0.5"].end_time, configs["ffjord-T1"].end_time] == [0.5, 1.0]
    alternate = configs["toflow-a0.3-alt4"]
    assert (alternate.time_schedule, alternate.weight_steps, alternate.time_steps, alternate.time_alpha) == (
        "alternate", 4, 1, 0.3)
    assert configs["toflow-a0.1"].time_schedule == "joint"
    assert (configs["toflow-a0.1-rnode"].kinetic, configs["toflow-a0.1-tpr"].tpr_weight) == (0.01, 5.0)
    assert toflow.build_protocol(toflow.parse_args(["--budget", "30"])).budget.seconds == 30.0
    assert toflow.build_protocol(toflow.parse_args(["--iterations", "5"])).budget.iterations == 5


def test_the_control_runs_after_the_others_at_their_final_time(tmp_path, monkeypatch):
    monkeypatch.setattr(toflow, "BASE", dict(hidden=(8,), batch_size=64, rtol=1e-3, atol=1e-3, lr=1e-2))
    monkeypatch.setattr(toflow, "EVAL_TOLERANCE", 1e-3)
    monkeypatch.setattr(toflow, "TIME", dict(toflow.TIME, time_lr=0.05))  # T moves visibly in 3 iterations
    document = tmp_path / "REPRODUCTION.md"
    toflow.main(["--iterations", "3", "--validations", "1", "--seeds", "0", "--datasets", "8gaussians",
                 "--root", str(tmp_path / "runs"), "--document", str(document)])
    runs = tmp_path / "runs" / "8gaussians"

    def summary(arm, seed):
        return json.loads((runs / arm / f"seed{seed}" / "summary.json").read_text())

    final = summary("toflow-a0.1", 0)["hooks"]["end_times"][0]
    assert abs(final - 1.0) > 1e-3
    control = summary("control", 0)
    assert control["config"]["method"] == "ffjord" and control["config"]["end_time"] == round(final, 3)
    assert control["hooks"] == {"end_times": [control["config"]["end_time"]], "control_of": "toflow-a0.1"}
    assert control["arm_index"] == 8  # after the eight other arms
    assert summary("ffjord-T0.5", 0)["hooks"]["end_times"] == [0.5]
    text = document.read_text()
    assert "## TO-FLOW: trainable end time" in text and "### Time to FFJORD's quality" in text
    assert "scaled-down run, not the protocol" in text and "not an equal-time budget" in text
    assert "| control |" in text
    assert (tmp_path / "reproduction" / "toflow" / "8gaussians-end-time.png").stat().st_size > 1000


def _run(arm, seed, times, nlls, test_nll, end_time=1.0, control_of=None, index=0):
    """A synthetic finished run whose validation NLL is ``nlls`` at CPU seconds ``times``."""
    hooks = {"end_times": [end_time], **({"control_of": control_of} if control_of else {})}
    summary = {"dataset": "8gaussians", "arm": arm, "arm_index": index, "seed": seed, "label": arm,
               "status": "finished", "budget": {"seconds": 100.0, "iterations": None, "validations": 4,
                                                "clock": "thread"},
               "test": {"nll": test_nll, "nfe": 50.0}, "hooks": hooks}
    times = np.asarray(times, dtype=float)
    validation = {"cpu_seconds": times, "nfe_cumulative": times * 100, "nll": np.asarray(nlls, dtype=float)}
    return Run(summary, {}, validation)


def _runs(control_times):
    grid = [0, 25, 50, 75, 100]
    runs = []
    for seed in (0, 1):
        runs += [_run("ffjord-T0.5", seed, grid, [5, 3.5, 3.2, 3.1, 3.1], 3.1, 0.5, index=0),
                 _run("ffjord-T1", seed, grid, [5, 3.4, 3.1, 3.0, 3.0], 3.0, index=1),
                 _run("toflow-a0.1", seed, grid, [5, 3.1, 3.0, 2.99, 2.98], 2.98, 0.6, index=2),
                 _run("control", seed, grid, control_times, 2.99, 0.6, "toflow-a0.1", index=8)]
    return runs


def test_final_end_time_is_the_mean_over_seeds(tmp_path):
    arm = toflow.arms(("8gaussians",))[2]
    for seed, end_time in ((0, 0.6004), (1, 0.7)):
        directory = tmp_path / "8gaussians" / arm.name / f"seed{seed}"
        directory.mkdir(parents=True)
        (directory / "summary.json").write_text(json.dumps({"status": "finished", "hooks": {"end_times": [end_time]}}))
    assert toflow.final_end_time(str(tmp_path), arm, (0, 1)) == 0.65
    assert toflow.final_end_time(str(tmp_path), arm, (0, 1, 2)) is None  # seed 2 has not finished


def test_time_to_reach_is_the_first_validation_at_the_threshold():
    run = _run("x", 0, [0, 25, 50], [5.0, 3.0, 2.9], 2.9)
    assert toflow.time_to_reach(run, 3.0) == (25.0, 2500.0)
    assert toflow.time_to_reach(run, 2.5) is None


def test_report_reads_the_targets_and_the_control():
    # thresholds: ffjord-T1 3.0 + 0.02, reached by it at 75 s and by toflow at 50 s (0.67x);
    # ffjord-T0.5 3.1 + 0.02, reached by it at 75 s and by toflow at 25 s (0.33x)
    text = toflow.REPORT.findings(_runs([5, 3.3, 3.1, 3.0, 2.99]))
    assert ("8gaussians, to ffjord-T1's quality (3.020; ffjord-T1 takes 75 s): target (≤ 0.8x FFJORD's time) "
            "**met** by toflow-a0.1 (0.67x); **missed** by none.") in text
    assert "to ffjord-T0.5's quality (3.120; ffjord-T0.5 takes 75 s): target (≤ 0.8x FFJORD's time) **met** by " \
           "toflow-a0.1 (0.33x)" in text
    assert "| toflow-a0.1 | 25 ± 0 s, 2500 ± 0 NFE (2/2); 0.33x | 50 ± 0 s, 5000 ± 0 NFE (2/2); 0.67x |" in text
    assert "control vs toflow-a0.1 (to ffjord-T1's quality): 75 s vs 50 s" in text
    assert "optimizing T during training helps" in text
    text = toflow.REPORT.findings(_runs([5, 3.1, 3.0, 2.99, 2.99]))
    assert "control vs toflow-a0.1 (to ffjord-T1's quality): 50 s vs 50 s" in text
    assert "the gain comes from a better T, not from optimizing T during training" in text
    assert "final test NLL control 2.990 vs toflow-a0.1 2.980" in text
