"""The command line: train, sample and eval from a checkpoint; bad input exits 2 with one clear line."""

import json
import subprocess
import sys

import numpy as np
import pytest

from fastcnf.training.cli import main

TINY = ["--hidden", "8", "--batch-size", "32", "--rtol", "1e-3", "--atol", "1e-3", "--val-size", "200", "--no-plot",
        "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    assert main(["train", "--data", "moons", "--iterations", "3", "--val-every", "3", "--out", out, *TINY]) == 0
    return out


def test_train_prints_a_summary_line(run_dir, capsys):
    assert main(["train", "--out", run_dir, "--resume", "--iterations", "4", "--no-progress"]) == 0
    assert "test NLL" in capsys.readouterr().out
    with open(f"{run_dir}/metrics.csv") as handle:
        assert len(handle.readlines()) == 5  # header + 4 iterations


def test_sample_writes_npy_and_csv(run_dir, tmp_path, capsys):
    assert main(["sample", "--checkpoint", run_dir, "--num", "50", "--out", str(tmp_path / "s.npy")]) == 0
    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (50, 2) and np.isfinite(samples).all()
    assert main(["sample", "--checkpoint", f"{run_dir}/checkpoint.pt", "--num", "50",
                 "--out", str(tmp_path / "s.csv")]) == 0
    np.testing.assert_allclose(np.loadtxt(tmp_path / "s.csv", delimiter=","), samples, rtol=1e-6)
    assert "wrote 50 samples" in capsys.readouterr().out


def test_eval_reports_the_trainers_test_nll(run_dir, capsys):
    assert main(["eval", "--checkpoint", run_dir, "--split", "test"]) == 0
    report = json.loads(capsys.readouterr().out)
    with open(f"{run_dir}/metrics.json") as handle:
        summary = json.load(handle)
    assert report["points"] == 5000 and report["iteration"] == summary["iteration"]
    assert report["nll"] == pytest.approx(summary["test"]["nll"], rel=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "mnist"], "unknown dataset 'mnist'"),
    (["train", "--lr", "-1"], "lr must be a positive finite number"),
    (["train", "--iterations", "0"], "iterations must be a positive integer"),
    (["train", "--solver", "rk4"], "fixed-step: pass a step size"),
    (["train", "--data", "/nonexistent/table.csv"], "does not exist"),
    (["train", "--resume"], "no checkpoint"),
    (["eval", "--checkpoint", "/nonexistent/run"], "no checkpoint at '/nonexistent/run'"),
    (["sample", "--checkpoint", "/nonexistent/run"], "no checkpoint at"),
    (["sample", "--checkpoint", "x", "--num", "0"], "--num must be a positive integer"),
])
def test_bad_input_exits_2_with_one_line(argv, message, tmp_path, capsys):
    argv = argv + ["--out", str(tmp_path / "run")] if argv[0] == "train" else argv
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and error.startswith(f"fastcnf {argv[0]}: error:")


def test_resume_refuses_changed_settings_and_existing_runs_need_resume(run_dir, capsys):
    assert main(["train", "--out", run_dir, "--resume", "--lr", "0.1"]) == 2
    assert "--lr cannot be changed on --resume" in capsys.readouterr().err
    assert main(["train", "--out", run_dir, *TINY]) == 2
    assert "it holds a finished run; pass --resume" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train", "--method", "sgd"], ["train", "--rtol", "abc"],
                                  ["train", "--hidden", "64,x"], ["eval"]])
def test_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_the_module_entry_point_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fastcnf", "train", "--data", "nope", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "fastcnf train: error: unknown dataset 'nope'; use one of 8gaussians, checkerboard, 2spirals, moons, circles, "
        "pinwheel, rings, swissroll, digits or a .npy/.csv file."]
