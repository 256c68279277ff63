"""Shared test helpers: stop a CLI training run (SIGKILL after its first checkpoint, or Ctrl-C) and resume it."""

import os
import signal
import subprocess
import sys
import time

from fastcnf.training.checkpoint import load_checkpoint

__all__ = ["kill_after_first_checkpoint_and_resume", "interrupt_and_resume"]


def kill_after_first_checkpoint_and_resume(start, full, killed):
    """Run ``start(full)`` to the end and ``start(killed)`` until its first checkpoint, SIGKILL the
    latter, resume it with ``python -m fastcnf train --resume``; returns the iteration it was killed at.

    ``start(out)`` launches a training subprocess (``subprocess.Popen``) writing to ``out``.
    """
    reference = start(full)
    victim = start(killed)
    checkpoint = os.path.join(killed, "checkpoint.pt")
    deadline = time.time() + 120
    while not os.path.exists(checkpoint) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    stopped_at = load_checkpoint(killed)["iteration"]
    resumed = subprocess.run([sys.executable, "-m", "fastcnf", "train", "--out", killed, "--resume", "--no-progress"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    return stopped_at


def interrupt_and_resume(start, full, interrupted, after_rows):
    """Run ``start(full)`` to the end; run ``start(interrupted)``, send it SIGINT (Ctrl-C) once its
    metrics.csv holds ``after_rows`` iterations, and resume it with ``python -m fastcnf train --resume``.

    Returns ``(exit code, stderr, iteration of the checkpoint it left)`` of the interrupted run.
    """
    reference = start(full)
    victim = start(interrupted)
    metrics = os.path.join(interrupted, "metrics.csv")
    deadline = time.time() + 120
    while victim.poll() is None and time.time() < deadline:
        if os.path.exists(metrics):
            with open(metrics) as handle:
                if len(handle.readlines()) > after_rows:  # header + rows
                    break
        time.sleep(0.02)
    assert victim.poll() is None, "the run ended before it could be interrupted"
    victim.send_signal(signal.SIGINT)
    _, stderr = victim.communicate(timeout=120)
    stopped_at = load_checkpoint(interrupted)["iteration"]
    resumed = subprocess.run([sys.executable, "-m", "fastcnf", "train", "--out", interrupted, "--resume",
                              "--no-progress"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    return victim.returncode, stderr, stopped_at
