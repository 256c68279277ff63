"""The trainer: NLL goes down, runs resume bit for bit (also after SIGKILL), files are written."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from cli_runs import kill_after_first_checkpoint_and_resume

from fastcnf.training.checkpoint import load_checkpoint
from fastcnf.training.config import ConfigError, TrainConfig
from fastcnf.training.trainer import Trainer, TrainingDiverged

TINY = dict(hidden=(16, 16), batch_size=64, rtol=1e-3, atol=1e-3, lr=1e-2, val_size=500, plot=False)
COMPARED = ("iteration", "phase", "loss", "nll", "end_time", "nfe_forward", "nfe_backward")


def _rows(out):
    with open(os.path.join(out, "metrics.csv"), newline="") as handle:
        return [{key: row[key] for key in COMPARED} for row in csv.DictReader(handle)]


def test_short_training_lowers_the_validation_nll(tmp_path):
    trainer = Trainer(TrainConfig(out=str(tmp_path), iterations=40, val_every=40, checkpoint_every=40, **TINY),
                      progress=False)
    before = trainer.validate()["nll"]
    summary = trainer.run()
    after = summary["validation"][-1]["nll"]
    assert after < before - 0.8, (before, after)  # 8gaussians: about 6 nats at start
    assert summary["test"]["nll"] == pytest.approx(after, abs=0.3)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["iteration"] == 40 and saved["mean_nfe_forward"] > 0
    assert len(_rows(str(tmp_path))) == 40


def test_resume_continues_bit_for_bit(tmp_path):
    settings = dict(method="toflow", tpr_weight=1.0, divergence="hutchinson-rademacher", iterations=8, val_every=4,
                    checkpoint_every=4, weight_steps=2, time_steps=1, **TINY)
    Trainer(TrainConfig(out=str(tmp_path / "full"), **settings), progress=False).run()
    Trainer(TrainConfig(out=str(tmp_path / "part"), **{**settings, "iterations": 4}), progress=False).run()
    Trainer.resume(str(tmp_path / "part"), iterations=8, progress=False).run()
    assert _rows(str(tmp_path / "part")) == _rows(str(tmp_path / "full"))
    full, part = load_checkpoint(str(tmp_path / "full")), load_checkpoint(str(tmp_path / "part"))
    for name, value in full["model"].items():
        assert torch.equal(part["model"][name], value), name
    assert part["validation"] == full["validation"]


def _cli(out, *extra):
    command = [sys.executable, "-m", "fastcnf", "train", "--data", "8gaussians", "--method", "tpr", "--divergence",
               "hutchinson-gaussian", "--hidden", "16,16", "--batch-size", "64", "--rtol", "1e-3", "--atol", "1e-3",
               "--iterations", "40", "--checkpoint-every", "10", "--val-every", "20", "--threads", "1", "--no-plot",
               "--no-progress", "--out", out, *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    stopped_at = kill_after_first_checkpoint_and_resume(_cli, full, killed)
    assert 10 <= stopped_at < 40
    assert _rows(killed) == _rows(full)
    assert len(_rows(full)) == 40


def test_existing_run_needs_resume_and_iterations_cannot_shrink(tmp_path):
    config = TrainConfig(out=str(tmp_path), iterations=2, checkpoint_every=1, val_every=2, **TINY)
    Trainer(config, progress=False).run()
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        Trainer(config, progress=False)
    with pytest.raises(ConfigError, match="beyond --iterations 1"):
        Trainer.resume(str(tmp_path), iterations=1, progress=False)


def test_divergence_is_reported(tmp_path, monkeypatch):
    trainer = Trainer(TrainConfig(out=str(tmp_path), iterations=2, **TINY), progress=False)
    monkeypatch.setattr(trainer.training_method, "loss", lambda model, batch: (torch.tensor(float("nan")), {}))
    with pytest.raises(TrainingDiverged, match="the loss became nan at iteration 1"):
        trainer.run()


def test_digits_run_writes_a_sample_picture(tmp_path):
    config = TrainConfig(data="digits", out=str(tmp_path), iterations=2, val_every=2, checkpoint_every=2,
                         **{**TINY, "plot": True, "val_size": 100, "hidden": (32,)})
    summary = Trainer(config, progress=False).run()
    assert summary["picture"] == str(tmp_path / "samples.png") and os.path.getsize(summary["picture"]) > 1000
    assert 0 < summary["test"]["nll"] < 1000
