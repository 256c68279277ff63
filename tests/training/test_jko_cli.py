"""JKO-iFlow through the trainer and the command line: early end of the schedule, bit-exact
resumption mid-stack (also after SIGKILL), eval/sample of a run, clear errors for bad options."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_runs import kill_after_first_checkpoint_and_resume

from fastcnf.training.checkpoint import load_checkpoint
from fastcnf.training.cli import main
from fastcnf.training.config import TrainConfig
from fastcnf.training.trainer import Trainer

SCHEDULE = dict(method="jko", hidden=(16, 16), batch_size=64, lr=1e-2, jko_block_iterations=6, jko_max_blocks=3,
                jko_tolerance=0.0, jko_reparameterize=True, jko_refine=True, jko_refine_threshold=0.0,
                jko_finetune_iterations=4, jko_pool=1000,
                jko_steps=2, val_every=10, val_size=200, checkpoint_every=1000, plot=False)
TOTAL = 3 * 6 + 3 * 4 + 6 * 4  # grow 3 blocks, fine-tune them after re-spacing, fine-tune the 6 halves
IGNORED = ("seconds",)  # wall time is the only column allowed to differ


def _rows(out):
    with open(os.path.join(out, "metrics.csv"), newline="") as handle:
        return [{k: v for k, v in row.items() if k not in IGNORED} for row in csv.DictReader(handle)]


def test_schedule_ends_the_run_and_chained_resumes_are_bit_exact(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    summary = Trainer(TrainConfig(out=full, iterations=1000, **SCHEDULE), progress=False).run()
    assert summary["iteration"] == TOTAL
    phases = [row["phase"] for row in _rows(full)]
    assert phases == ["grow"] * 18 + ["reparameterize"] * 12 + ["refine"] * 24
    assert [row["block"] for row in _rows(full)][:18] == [str(k) for k in (1, 2, 3) for _ in range(6)]

    # stop at a stage end (6), at the end of the growth (18), mid re-spacing (25) and mid refinement (41)
    Trainer(TrainConfig(out=part, iterations=6, **SCHEDULE), progress=False).run()
    for stop in (18, 25, 41, 1000):
        Trainer.resume(part, iterations=stop, progress=False).run()
    assert _rows(part) == _rows(full)
    full_state, part_state = load_checkpoint(full), load_checkpoint(part)
    assert part_state["iteration"] == TOTAL and part_state["optimization"] == full_state["optimization"]
    assert part_state["model"]["_extra_state"] == full_state["model"]["_extra_state"]
    assert len(part_state["model"]["_extra_state"]["intervals"]) == 6
    for name, value in full_state["model"].items():
        if name != "_extra_state":
            assert torch.equal(part_state["model"][name], value), name
    history = full_state["optimization"]["history"]
    assert [(record["phase"], record["block"]) for record in history] == (
        [("grow", k) for k in range(3)] + [("reparameterize", k) for k in range(3)] + [("refine", k) for k in range(6)])


def test_eval_and_sample_load_the_whole_stack(tmp_path, capsys):
    out = str(tmp_path / "run")
    summary = Trainer(TrainConfig(out=out, iterations=20, **SCHEDULE), progress=False).run()  # 4 blocks: cut mid-growth
    capsys.readouterr()
    assert main(["eval", "--checkpoint", out]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "jko" and report["nll"] == pytest.approx(summary["test"]["nll"], rel=1e-6)
    assert main(["sample", "--checkpoint", out, "--num", "30", "--out", str(tmp_path / "s.npy")]) == 0
    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (30, 2) and np.isfinite(samples).all()


def _cli(out, *extra):
    command = [sys.executable, "-m", "fastcnf", "train", "--method", "jko", "--data", "8gaussians", "--hidden", "16,16",
               "--batch-size", "64", "--lr", "1e-2", "--jko-block-iterations", "60", "--jko-max-blocks", "3",
               "--jko-tolerance", "0", "--jko-reparameterize", "--jko-finetune-iterations", "30", "--jko-pool", "1000",
               "--jko-steps", "2", "--iterations", "1000", "--checkpoint-every", "25", "--val-every", "50",
               "--val-size", "200", "--threads", "1", "--no-plot", "--no-progress", "--out", out, *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_stack_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    stopped_at = kill_after_first_checkpoint_and_resume(_cli, full, killed)
    assert 25 <= stopped_at < 270
    assert len(_rows(full)) == 3 * 60 + 3 * 30
    assert _rows(killed) == _rows(full)
    assert load_checkpoint(killed)["optimization"] == load_checkpoint(full)["optimization"]


@pytest.mark.parametrize("argv, message", [
    (["--jko-h0", "0"], "jko_h0 must be a positive finite number, got 0.0"),
    (["--jko-rho", "-1"], "jko_rho must be a positive finite number"),
    (["--jko-block-iterations", "0"], "jko_block_iterations must be a positive integer"),
    (["--jko-max-blocks", "0"], "jko_max_blocks must be a positive integer"),
    (["--jko-steps", "-2"], "jko_steps must be a positive integer"),
    (["--jko-tolerance", "-0.1"], "jko_tolerance must be a finite number >= 0"),
    (["--jko-pool", "100", "--batch-size", "512"], "batch_size=512 exceeds jko_pool=100"),
    (["--data", "digits", "--batch-size", "5000"], "batch size 5000 exceeds the 1437 training points"),
    (["--jko-eta", "0"], "jko_eta must be in (0, 1], got 0.0"),
    (["--jko-eta", "1.5"], "jko_eta must be in (0, 1], got 1.5"),
    (["--jko-h-min", "2", "--jko-h-max", "1"], "need jko_h_min <= jko_h_max, got 2.0 and 1.0"),
    (["--jko-h-max", "0"], "jko_h_max must be a positive finite number"),
    (["--jko-clip", "-1"], "jko_clip must be a finite number >= 0"),
    (["--jko-rounds", "0"], "jko_rounds must be a positive integer"),
    (["--jko-refine-threshold", "-0.5"], "jko_refine_threshold must be a finite number >= 0"),
    (["--jko-finetune-lr", "0"], "jko_finetune_lr must be a positive finite number"),
    (["--jko-lr-decay", "0"], "jko_lr_decay must be a positive finite number"),
])
def test_bad_jko_options_exit_2_with_one_line(argv, message, tmp_path, capsys):
    assert main(["train", "--method", "jko", *argv, "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and error.startswith("fastcnf train: error:")


@pytest.mark.parametrize("argv", [["--jko-solver", "rk5"], ["--jko-steps", "x"], ["--jko-reparameterize", "yes"],
                                  ["--jko-block-time", "global"]])
def test_jko_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", "jko", *argv])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_every_jko_setting_is_on_the_command_line():
    import dataclasses

    from fastcnf.training.cli import build_parser

    argv = ["train", "--method", "jko", "--jko-h0", "0.3", "--jko-rho", "1.5", "--jko-h-min", "0.02",
            "--jko-h-max", "4", "--jko-block-time", "unit", "--jko-block-iterations", "7", "--jko-max-blocks", "5",
            "--jko-tolerance", "0.02", "--jko-reparameterize", "--jko-rounds", "3", "--jko-eta", "0.25",
            "--jko-refine", "--jko-refine-threshold", "1.5", "--jko-finetune-iterations", "6", "--jko-clip", "2",
            "--jko-finetune-lr", "3e-4", "--jko-lr-decay", "0.9", "--jko-solver", "midpoint", "--jko-steps", "5",
            "--jko-pool", "3000", "--no-adjoint", "--test-solver", "dopri5", "--test-rtol", "1e-6",
            "--test-atol", "1e-7"]
    settings = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if k != "command"}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in settings.items() if k in known})
    jko_fields = {f.name for f in dataclasses.fields(TrainConfig) if f.name.startswith("jko_")}
    assert jko_fields <= set(settings), sorted(jko_fields - set(settings))
    assert (config.jko_h0, config.jko_rho, config.jko_h_min, config.jko_h_max, config.jko_block_time) == (
        0.3, 1.5, 0.02, 4.0, "unit")
    assert (config.jko_block_iterations, config.jko_max_blocks, config.jko_tolerance, config.jko_reparameterize,
            config.jko_rounds, config.jko_eta) == (7, 5, 0.02, True, 3, 0.25)
    assert (config.jko_refine, config.jko_refine_threshold, config.jko_finetune_iterations, config.jko_clip,
            config.jko_finetune_lr, config.jko_lr_decay) == (True, 1.5, 6, 2.0, 3e-4, 0.9)
    assert (config.jko_solver, config.jko_steps, config.jko_pool, config.adjoint) == ("midpoint", 5, 3000, False)
    assert (config.test_solver, config.test_rtol, config.test_atol, config.lr) == ("dopri5", 1e-6, 1e-7, 1e-4)
