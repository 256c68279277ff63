"""The training CLI when things go wrong: a second training on the same --out, folders a new run would
replace, Ctrl-C, unwritable or full folders, bad checkpoints, runaway solves. Each ends with one line
and a defined exit code, and loses nothing that was already written."""

import csv
import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from cli_runs import interrupt_and_resume

from fastcnf.training import checkpoint as checkpoint_module
from fastcnf.training.checkpoint import load_checkpoint
from fastcnf.training.cli import main
from fastcnf.training.config import TrainConfig
from fastcnf.training.run_folder import LOCK_NAME

TINY = ["--data", "8gaussians", "--hidden", "8", "--batch-size", "32", "--rtol", "1e-3", "--atol", "1e-3",
        "--val-size", "200", "--no-plot", "--no-progress", "--threads", "1"]


def one_line_error(capsys, command="train"):
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"fastcnf {command}: "), error
    return error


def train_process(out, iterations=40, *extra):
    command = [sys.executable, "-m", "fastcnf", "train", *TINY, "--iterations", str(iterations), "--val-every", "20",
               "--checkpoint-every", "10", "--out", out, *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _default_sigint():
    """Ctrl-C's default action in the child: a launcher that ignores SIGINT (a background job of a shell
    without job control) passes that on, and the CLI then leaves Ctrl-C alone, as it should."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler for the test (whatever the launcher set), restored afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def metrics_iterations(out):
    with open(os.path.join(out, "metrics.csv"), newline="") as handle:
        return [int(row["iteration"]) for row in csv.DictReader(handle)]


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if (folder / name).is_file()}


# ------------------------------------------------------------------------------ one run per folder
def test_a_second_training_on_the_same_out_is_refused_naming_the_holder(tmp_path, capsys):
    """Both used to exit 0, with every iteration twice in metrics.csv and one run's checkpoint lost."""
    out = str(tmp_path / "run")
    first = train_process(out, 60)
    lock = os.path.join(out, LOCK_NAME)
    deadline = time.time() + 60
    while not (os.path.exists(lock) and open(lock).read().strip()) and time.time() < deadline:
        time.sleep(0.02)
    assert main(["train", *TINY, "--iterations", "60", "--out", out]) == 2
    error = one_line_error(capsys)
    assert f"is in use by another training (pid {first.pid})" in error
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert metrics_iterations(out) == list(range(1, 61))
    assert load_checkpoint(out)["iteration"] == 60


def test_a_folder_that_is_not_a_run_is_refused_unless_overwrite(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert main(["train", *TINY, "--iterations", "2", "--out", str(folder)]) == 2
    assert "exists and is not a fastcnf run folder (it holds notes.txt, ...)" in one_line_error(capsys)
    assert os.listdir(folder) == ["notes.txt"]  # not even a lock file left behind
    assert main(["train", *TINY, "--iterations", "2", "--out", str(folder), "--overwrite"]) == 0
    assert (folder / "notes.txt").read_text() == "keep me"
    assert load_checkpoint(str(folder))["iteration"] == 2


def test_a_finished_run_is_kept_unless_overwrite(tmp_path, capsys):
    """Its metrics used to be deleted and config.json/density.png overwritten without a word."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--iterations", "3", "--out", str(out)]) == 0
    before = snapshot(out)
    assert main(["train", *TINY, "--iterations", "2", "--lr", "0.1", "--out", str(out)]) == 2
    assert "it holds a finished run; pass --resume with a larger --iterations" in one_line_error(capsys)
    assert snapshot(out) == before
    assert main(["train", *TINY, "--iterations", "2", "--out", str(out), "--overwrite"]) == 0
    assert metrics_iterations(str(out)) == [1, 2]
    assert load_checkpoint(str(out))["iteration"] == 2
    assert main(["train", "--out", str(out), "--resume", "--overwrite"]) == 2
    assert "pass one of them" in one_line_error(capsys)


def test_an_empty_existing_folder_is_fine(tmp_path):
    assert main(["train", *TINY, "--iterations", "1", "--out", str(tmp_path)]) == 0


# ---------------------------------------------------------------------------------------- Ctrl-C
def _ctrl_c_process(out):
    return train_process(out, 30, "--checkpoint-every", "100", "--val-every", "10", "--method", "tpr", "--divergence",
                         "hutchinson-gaussian")


def test_ctrl_c_checkpoints_the_current_iteration_and_resumes_bit_for_bit(tmp_path):
    full, interrupted = str(tmp_path / "full"), str(tmp_path / "interrupted")
    code, stderr, stopped_at = interrupt_and_resume(_ctrl_c_process, full, interrupted, after_rows=5)
    assert code == 130
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith(f"fastcnf train: interrupted at iteration {stopped_at}; checkpoint saved in "
                             f"{interrupted}")
    assert 5 <= stopped_at < 30  # checkpoint_every=100: the checkpoint is the interrupt's own
    with open(os.path.join(full, "metrics.csv")) as a, open(os.path.join(interrupted, "metrics.csv")) as b:
        full_rows = [row.rsplit(",", 1)[0] for row in a]  # all columns but the wall time
        resumed_rows = [row.rsplit(",", 1)[0] for row in b]
    assert resumed_rows == full_rows and len(full_rows) == 31
    full_state, resumed_state = load_checkpoint(full), load_checkpoint(interrupted)
    for name, value in full_state["model"].items():
        assert torch.equal(resumed_state["model"][name], value), name
    assert resumed_state["validation"] == full_state["validation"]


# ------------------------------------------------------------------------------ unwritable, full
@pytest.mark.parametrize("where", ["under a file", "in /sys"])
def test_an_unwritable_out_is_one_line(tmp_path, capsys, where):
    if where == "in /sys" and not os.path.isdir("/sys"):
        pytest.skip("no /sys")
    (tmp_path / "file").write_text("")
    out = str(tmp_path / "file" / "run") if where == "under a file" else "/sys/fastcnf-unwritable-run"
    assert main(["train", *TINY, "--iterations", "1", "--out", out]) == 2
    assert "cannot write to --out" in one_line_error(capsys)


def test_a_full_disk_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    saves = []
    real_save = torch.save

    def save_until_full(obj, handle):
        saves.append(1)
        if len(saves) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device", handle.name)
        real_save(obj, handle)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_until_full)
    assert main(["train", *TINY, "--iterations", "30", "--checkpoint-every", "10", "--out", out]) == 2
    assert "No space left on device" in one_line_error(capsys)
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert load_checkpoint(out)["iteration"] == 10
    assert [name for name in os.listdir(out) if name.endswith(".tmp")] == []
    assert main(["train", "--out", out, "--resume"]) == 0  # nothing lost: it continues from iteration 10
    assert metrics_iterations(out) == list(range(1, 31))


def test_sample_into_a_missing_folder_is_one_line(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--iterations", "1", "--out", run]) == 0
    target = str(tmp_path / "missing" / "s.npy")
    assert main(["sample", "--checkpoint", run, "--out", target]) == 2
    assert f"the folder of --out {target!r} does not exist" in one_line_error(capsys, "sample")
    assert not os.path.exists(tmp_path / "missing")


# --------------------------------------------------------------------------------- bad checkpoints
@pytest.fixture
def finished_run(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--iterations", "2", "--out", str(run)]) == 0
    return run


@pytest.mark.parametrize("damage, message", [
    ("truncated", "cannot read checkpoint .* \\(truncated, or not a fastcnf checkpoint\\)"),
    ("tensor", "is not a fastcnf training checkpoint: it holds a Tensor, not a dictionary"),
    ("state dict", "is not a fastcnf training checkpoint: no 'format' entry"),
    ("no config", "is not a fastcnf training checkpoint: no 'config' entry"),
])
@pytest.mark.parametrize("command", ["resume", "eval", "sample"])
def test_bad_checkpoints_are_one_line_and_change_nothing(finished_run, capsys, damage, message, command):
    path = finished_run / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    if damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif damage == "tensor":
        torch.save(torch.zeros(3), path)
    elif damage == "state dict":
        torch.save(state["model"], path)
    else:
        torch.save({key: value for key, value in state.items() if key != "config"}, path)
    before = snapshot(finished_run)
    argv = {"resume": ["train", "--out", str(finished_run), "--resume", "--iterations", "4"],
            "eval": ["eval", "--checkpoint", str(finished_run)],
            "sample": ["sample", "--checkpoint", str(finished_run), "--num", "5"]}[command]
    assert main(argv) == 2
    error = one_line_error(capsys, argv[0])
    assert __import__("re").search(message, error), error
    assert snapshot(finished_run) == before


# ----------------------------------------------------------------------------- runaway solves
def test_a_runaway_solve_stops_at_the_evaluation_budget(tmp_path):
    """--lr 1e6 used to stall in its second iteration for minutes (killed after 2 minutes here)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "fastcnf", "train", *TINY, "--hidden", "16,16",
                             "--batch-size", "64", "--rtol", "1e-5", "--atol", "1e-5", "--lr", "1e6",
                             "--iterations", "20", "--max-nfe", "3000", "--checkpoint-every", "1",
                             "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("fastcnf train: iteration 2 stopped: its ODE solves needed more than 3000 "
                                    "evaluations of the network (--max-nfe)")
    assert result.stderr.endswith("the checkpoint of iteration 1 is kept.\n")
    assert load_checkpoint(str(tmp_path / "run"))["iteration"] == 1
    assert time.perf_counter() - start < 120


def test_the_evaluation_budget_has_a_default_and_can_change_on_resume(tmp_path, capsys):
    assert TrainConfig().max_nfe == 20000
    out = str(tmp_path / "run")
    assert main(["train", *TINY, "--iterations", "2", "--out", out]) == 0
    assert main(["train", "--out", out, "--resume", "--iterations", "3", "--max-nfe", "0"]) == 0
    assert load_checkpoint(out)["config"]["max_nfe"] == 0


def test_a_second_ctrl_c_stops_at_once_with_one_line(tmp_path):
    out = str(tmp_path / "run")
    process = train_process(out, 400)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(out, "metrics.csv")) and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith("fastcnf train: interrupted")


@pytest.mark.parametrize("in_loop", [True, False], ids=["training-loop", "final-evaluation"])
def test_a_first_ctrl_c_stops_after_the_iteration_in_the_loop_and_at_once_outside_it(in_loop, python_sigint):
    """In the loop Ctrl-C only asks for a stop (the iteration in progress finishes and is checkpointed); in
    the final evaluation, where nothing is left to checkpoint, it interrupts at once instead of being ignored."""
    from types import SimpleNamespace

    from fastcnf.training.cli import _stop_on_first_interrupt

    trainer = SimpleNamespace(in_training_loop=in_loop, stop_requested=False)
    interrupted = False
    try:
        with _stop_on_first_interrupt(trainer):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler runs here, between two bytecodes of this thread
    except KeyboardInterrupt:
        interrupted = True
    assert (interrupted, trainer.stop_requested) == ((False, True) if in_loop else (True, False))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_sigint_the_launcher_ignores_stays_ignored(python_sigint):
    from types import SimpleNamespace

    from fastcnf.training.cli import _stop_on_first_interrupt

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with _stop_on_first_interrupt(SimpleNamespace(in_training_loop=True, stop_requested=False)):
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
