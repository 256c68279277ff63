"""bench/reproduce/jko.py: the issue's arms at equal JKO cost, a step-memory measurement that leaves the
run unchanged, and a tiny protocol through the harness to its report (tables, targets, samples)."""

import argparse
import dataclasses

import numpy as np
import pytest
import torch

from bench.reproduce import jko
from bench.reproduce.report import Run, write_report
from fastcnf.training.config import TrainConfig
from fastcnf.training.trainer import Trainer


def _args(**changes):
    values = dict(datasets=list(jko.DATASETS), arms=None, seeds=[0, 1, 2], seconds=None, iterations=None,
                  validations=10, clock=None, device="cpu", jko_iterations=[], mmd_points=jko.MMD_POINTS)
    values.update(changes)
    return argparse.Namespace(**values)


def test_the_protocol_has_the_issues_arms_at_equal_jko_cost():
    args = _args()
    protocol = jko.build_protocol(args)
    assert protocol.eval_tolerance == 1e-6 and protocol.base["test_solver"] == "dopri5" and protocol.seeds == (0, 1, 2)
    assert [(arm.dataset, arm.name) for arm in protocol.arms] == [
        (d, a) for d in jko.DATASETS for a in ("F", "G", "R", "RR")]
    f, g, r, rr = (arm.overrides for arm in protocol.arms[:4])
    assert (f["method"], f["solver"], f["rtol"], f["atol"], f["adjoint"]) == ("ffjord", "dopri5", 1e-4, 1e-4, True)
    for arm in (g, r, rr):
        assert arm["method"] == "jko" and arm["adjoint"] and arm["jko_max_blocks"] == jko.BLOCKS
    assert not g.get("jko_reparameterize") and r["jko_reparameterize"] and not r.get("jko_refine")
    assert rr["jko_reparameterize"] and rr["jko_refine"]
    total = jko.JKO_ITERATIONS["8gaussians"]
    for passes, arm in ((1, g), (2, r), (3, rr)):  # growing, re-spaced and refined passes share the total
        assert 0 <= total - passes * jko.BLOCKS * arm["jko_block_iterations"] < passes * jko.BLOCKS
    # a JKO arm's cap is never reached by its schedule; its validations spread over the schedule
    budget = jko.jko_budget(protocol, protocol.arms[1], total)
    assert budget.iterations == 2 * total and budget.last_due(total) == 10 and budget.clock == "thread"
    scaled = jko.build_protocol(_args(datasets=["checkerboard"], jko_iterations=[("checkerboard", 60)]))
    assert scaled.arms[1].overrides["jko_block_iterations"] == 10
    for arm in protocol.arms:  # every arm is a valid configuration
        TrainConfig(**{**protocol.base, **arm.overrides})
    with pytest.raises(SystemExit, match="sets its own budgets"):
        jko.build_protocol(_args(seconds=60.0))


@pytest.mark.parametrize("clock", [None, "thread", "wall"])
def test_ffjord_gets_the_longest_jko_time_of_its_pair_on_the_budget_clock(clock):
    protocol = jko.build_protocol(_args(validations=4, clock=clock))
    clock = clock or "thread"  # CPU time of the training thread by default on CPU
    assert protocol.budget.clock == clock
    summaries = [{"budget": {"clock": clock}, "train_cpu_seconds": cpu, "train_wall_seconds": wall}
                 for cpu, wall in ((12.5, 40.0), (30.25, 35.0), (20.0, 90.0))]
    budget = jko.ffjord_budget(protocol, summaries)
    expected = 30.25 if clock == "thread" else 90.0
    assert (budget.seconds, budget.clock, budget.validations) == (expected, clock, 4)
    assert budget.used(10, cpu_seconds=99.0, wall_seconds=30.0) == (99.0 if clock == "thread" else 30.0)
    assert jko.build_protocol(_args(device="cuda")).budget.clock == "wall"


def _trainer(tmp_path, name, **changes):
    settings = dict(method="jko", hidden=(16, 16), activation="softplus", batch_size=64, lr=1e-2, jko_pool=500,
                    jko_block_iterations=4, jko_max_blocks=3, jko_tolerance=0.0, jko_steps=2, plot=False,
                    out=str(tmp_path / name), val_size=100)
    settings.update(changes)
    return Trainer(TrainConfig(**settings), progress=False)


@pytest.mark.parametrize("method", ["jko", "ffjord"])
def test_measuring_step_memory_leaves_the_run_unchanged(tmp_path, method):
    changes = {} if method == "jko" else dict(method="ffjord", rtol=1e-3, atol=1e-3)
    plain = _trainer(tmp_path, "plain", **changes)  # trainers share the global RNG: run one after the other
    for _ in range(10):
        plain.train_step()
    measured, peaks = _trainer(tmp_path, "measured", **changes), []
    for iteration in range(1, 11):
        measured.train_step()
        if iteration in (2, 5, 9):  # mid-block and at a block's first iteration (JKO)
            peaks.append(jko.step_peak_bytes(measured))
    assert all(peak > 0 for peak in peaks)
    for a, b in zip(measured.model.state_dict().values(), plain.model.state_dict().values()):
        assert a == b if not isinstance(a, torch.Tensor) else torch.equal(a, b)
    if method == "jko":  # adjoint: one block's step memory, the same in every block
        assert max(peaks) == pytest.approx(min(peaks), rel=0.05)  # 2.5% seen after other tests


def test_a_tiny_protocol_runs_to_its_report(tmp_path):
    """The whole pipeline on one dataset and seed: the JKO arms run their schedules, F runs for their
    measured training CPU time, and the report section shows the table, the targets and the samples."""
    args = _args(datasets=["8gaussians"], seeds=[0], validations=1, jko_iterations=[("8gaussians", 24)],
                 mmd_points=200)
    protocol = jko.build_protocol(args)
    tiny = {"hidden": (8, 8), "batch_size": 64, "jko_pool": 400}
    protocol = dataclasses.replace(protocol, arms=tuple(dataclasses.replace(arm, overrides={**arm.overrides, **tiny})
                                                        for arm in protocol.arms), eval_tolerance=1e-4, val_size=200)
    summaries = jko.run(protocol, str(tmp_path / "runs"), args)
    by_arm = {s["arm"]: s for s in summaries}
    assert [s["arm"] for s in summaries] == ["G", "R", "RR", "F"]  # F is timed by the JKO arms
    jko_cpu = max(by_arm[name]["train_cpu_seconds"] for name in ("G", "R", "RR"))
    assert by_arm["F"]["budget"] == {"iterations": None, "seconds": jko_cpu, "validations": 1, "clock": "thread"}
    assert jko_cpu <= by_arm["F"]["train_cpu_seconds"] < jko_cpu + 10 * max(  # stops at the step crossing it
        1.0, by_arm["F"]["train_cpu_seconds"] / by_arm["F"]["iterations"])
    assert by_arm["G"]["iterations"] == 24 and by_arm["G"]["hooks"]["blocks"] == jko.BLOCKS  # 6 x 4
    assert by_arm["R"]["iterations"] == 24  # 6 x 2 growing + 6 x 2 fine-tuning
    assert by_arm["RR"]["hooks"]["blocks"] > jko.BLOCKS  # some blocks were split
    history = by_arm["RR"]["hooks"]["history"]
    assert [record["phase"] for record in history][:12] == ["grow"] * 6 + ["reparameterize"] * 6
    for summary in summaries:
        hooks = summary["hooks"]
        assert summary["status"] == "finished" and hooks["mmd2"] == hooks["mmd2"] and len(hooks["samples"]) == 200
    assert jko.run(protocol, str(tmp_path / "runs"), args) == summaries  # finished runs are not redone
    document = write_report(jko.REPORT, str(tmp_path / "runs"), str(tmp_path / "REPRODUCTION.md"))
    text = document.read_text()
    assert "## JKO-iFlow: block-wise training" in text and "a scaled-down run, not the protocol" in text
    assert "8gaussians, G: test NLL" in text and "reparameterization (G -> R, equal iterations)" in text
    assert text.count("target 1 **") == 3 and text.count("target 2 **") == 2
    assert (tmp_path / "reproduction" / "jko" / "8gaussians-samples.png").is_file()


@pytest.mark.parametrize("clock", ["thread", "wall"])
def test_time_to_reach_reads_the_first_validation_point_at_or_below_on_the_budget_clock(clock):
    validation = {"wall_seconds": np.array([0.0, 5.0, 10.0, 15.0]), "cpu_seconds": np.array([0.0, 4.0, 8.0, 12.0]),
                  "nll": np.array([3.0, 2.5, 2.0, 2.1])}
    run = Run({"budget": {"clock": clock}}, {}, validation)
    scale = 0.8 if clock == "thread" else 1.0
    assert jko.time_to_reach(run, 2.5) == 5.0 * scale and jko.time_to_reach(run, 2.05) == 10.0 * scale
    assert jko.time_to_reach(run, 1.9) is None


def test_growth_and_final_nll_split_a_run_at_the_end_of_its_growing_pass():
    validation = {"iteration": np.array([0.0, 10.0, 20.0, 30.0, 40.0]), "nll": np.array([5.0, 4.0, 3.5, 3.4, 3.3])}
    run = Run({"config": {"jko_block_iterations": 4}}, {}, validation)  # 6 blocks x 4: growing ends at 24
    assert jko.growth_and_final_nll(run) == (3.5, 3.3)
