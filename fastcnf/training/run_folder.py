"""The ``--out`` folder of a training run: which training may write there, and what it may replace.

``claim_run_folder(out, resume, overwrite)`` runs before anything in the folder changes and holds the
folder until the run ends:

* One training at a time: an exclusive lock (``fcntl.flock``, non-blocking) on ``out/.fastcnf-lock``,
  a file holding the holder's pid. A second training on the same folder is refused naming that pid.
  The kernel drops the lock when its process dies, so a killed run never leaves the folder locked.
* A new run (no ``--resume``) starts only in a folder that does not exist or is empty. A folder
  holding a fastcnf run (finished or not) or anything else is refused unless ``--overwrite`` is given,
  which removes the files of an earlier run (``RUN_FILES``) and leaves anything else alone.
* ``--resume`` needs the run's checkpoint (checked when it is read).
* A folder the claim created is removed again when the run fails before writing anything into it.

Under torchrun rank 0 claims the folder for every process (they all share it).
"""

import contextlib
import errno
import fcntl
import json
import os

from .errors import ConfigError

__all__ = ["RunFolderError", "claim_run_folder", "describe_folder", "LOCK_NAME", "RUN_FILES"]

LOCK_NAME = ".fastcnf-lock"
# What a run writes into its folder (``fastcnf sample`` writes samples.npy there by default).
RUN_FILES = ("checkpoint.pt", "metrics.csv", "metrics.json", "config.json", "density.png", "samples.png",
             "samples.npy")


class RunFolderError(ConfigError):
    """The ``--out`` folder is in use by another training or holds something a new run would replace."""


def describe_folder(out):
    """What ``out`` holds: "missing", "empty", "finished run", "unfinished run" or "other"."""
    if not os.path.exists(out):
        return "missing"
    if not os.path.isdir(out):
        return "other"
    names = set(os.listdir(out)) - {LOCK_NAME}
    if not names:
        return "empty"
    if not names & {"checkpoint.pt", "config.json"}:
        return "other"
    try:
        with open(os.path.join(out, "metrics.json")) as handle:
            finished = json.load(handle).get("test") is not None
    except (OSError, ValueError, AttributeError):
        finished = False
    return "finished run" if finished else "unfinished run"


@contextlib.contextmanager
def claim_run_folder(out, resume=False, overwrite=False, world=None):
    """Hold ``out`` for one training (see the module docstring); raises ``RunFolderError``."""
    main = world is None or world.is_main
    lock, message, created = None, None, False
    new_folder = main and not os.path.exists(out)
    if main:
        try:
            lock, created = _lock(out)
            if not resume:
                _prepare_for_new_run(out, overwrite)
        except (RunFolderError, OSError) as error:
            message = _message(error, out)
    if world is not None and world.distributed:
        message = world.broadcast_object(message)
    if message is not None:
        _release(lock, remove=created)
        raise RunFolderError(message)
    try:
        yield
    finally:
        left_nothing = new_folder and os.listdir(out) == [LOCK_NAME]
        _release(lock, remove=left_nothing)
        if left_nothing:  # the run failed before writing anything: leave no empty folder behind
            os.rmdir(out)


def _lock(out):
    """Create ``out`` if needed and take its lock; returns the open lock file and whether it was created."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunFolderError(f"--out {out!r} is a file, not a folder.")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, LOCK_NAME)
    created = not os.path.exists(path)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunFolderError(f"{out!r} is in use by another training (pid {holder}); wait for it to end or choose "
                             "another --out.") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle, created


def _prepare_for_new_run(out, overwrite):
    state = describe_folder(out)
    if state == "empty":
        return
    if not overwrite:
        advice = {
            "finished run": "it holds a finished run; pass --resume with a larger --iterations to extend it",
            "unfinished run": "it already holds a run; pass --resume to continue it",
            "other": "it exists and is not a fastcnf run folder (it holds "
                     + ", ".join(sorted(set(os.listdir(out)) - {LOCK_NAME})[:3]) + ", ...)",
        }[state]
        raise RunFolderError(f"--out {out!r}: {advice}, --overwrite to start a new run there, or choose another "
                             "--out.")
    for name in os.listdir(out):
        if name in RUN_FILES or (name.startswith(".") and name.endswith(".tmp")):
            os.remove(os.path.join(out, name))


def _message(error, out):
    if isinstance(error, RunFolderError):
        return str(error)
    reason = error.strerror or errno.errorcode.get(error.errno, str(error))
    return f"cannot write to --out {out!r}: {reason} ({error.filename or out})."


def _release(handle, remove=False):
    """Drop the lock; ``remove`` deletes the lock file (one this claim created, in a folder it was refused
    or that the run left empty)."""
    if handle is not None:
        if remove:
            os.remove(handle.name)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
