"""bench/reproduce/jko.py: the issue's arms at equal JKO cost, a step-memory measurement that leaves the
run unchanged, and a tiny protocol through the harness to its report (tables, targets, samples)."""

import argparse
import dataclasses

import pytest
import torch

from bench.reproduce import jko
from bench.reproduce.harness import Budget, Protocol, run_protocol
from bench.reproduce.report import write_report
from fastcnf.training.config import TrainConfig
from fastcnf.training.trainer import Trainer


def _args(**changes):
    values = dict(datasets=list(jko.DATASETS), arms=None, seeds=[0, 1, 2], seconds=None, iterations=None,
                  default_iterations=2000, validations=10, clock=None, device="cpu", jko_iterations=[])
    values.update(changes)
    return argparse.Namespace(**values)


def test_the_protocol_has_the_issues_arms_at_equal_jko_cost():
    protocol = jko.build_protocol(_args())
    assert protocol.budget.seconds == jko.SECONDS and protocol.budget.clock == "thread"
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
    scaled = jko.build_protocol(_args(datasets=["checkerboard"], jko_iterations=[("checkerboard", 60)], seconds=5.0))
    assert scaled.budget.seconds == 5.0 and scaled.arms[1].overrides["jko_block_iterations"] == 10
    for arm in protocol.arms:  # every arm is a valid configuration
        TrainConfig(**{**protocol.base, **arm.overrides})


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
        assert max(peaks) == pytest.approx(min(peaks), rel=0.02)


@pytest.mark.slow  # about 40 s on a quiet 2-core machine
def test_a_tiny_protocol_runs_to_its_report(tmp_path):
    arms = [dataclasses.replace(arm, overrides={**arm.overrides, "hidden": (8, 8), "batch_size": 64, "jko_pool": 400})
            for arm in jko.arms(["8gaussians"], {"8gaussians": 24}, jko.JKOHooks(mmd_points=300))]
    protocol = Protocol("jko", tuple(arms), seeds=(0,), budget=Budget(iterations=40, validations=1),
                        base=dict(test_solver="dopri5"), eval_tolerance=1e-4, val_size=200)
    summaries = run_protocol(protocol, str(tmp_path / "runs"))
    by_arm = {s["arm"]: s for s in summaries}
    assert by_arm["F"]["iterations"] == 40  # FFJORD runs the whole budget
    assert by_arm["G"]["iterations"] == 24 and by_arm["G"]["hooks"]["blocks"] == jko.BLOCKS  # 6 x 4
    assert by_arm["R"]["iterations"] == 24  # 6 x 2 growing + 6 x 2 fine-tuning
    assert by_arm["RR"]["hooks"]["blocks"] > jko.BLOCKS  # some blocks were split
    history = by_arm["RR"]["hooks"]["history"]
    assert [record["phase"] for record in history][:12] == ["grow"] * 6 + ["reparameterize"] * 6
    for summary in summaries:
        hooks = summary["hooks"]
        assert summary["status"] == "finished" and hooks["mmd2"] > 0 and len(hooks["samples"]) == 300
    document = write_report(jko.REPORT, str(tmp_path / "runs"), str(tmp_path / "REPRODUCTION.md"))
    text = document.read_text()
    assert "## JKO-iFlow: block-wise training" in text and "a scaled-down run, not the protocol" in text
    assert "8gaussians, G: test NLL" in text and "reparameterization (G -> R, equal iterations)" in text
    assert (tmp_path / "reproduction" / "jko" / "8gaussians-samples.png").is_file()
