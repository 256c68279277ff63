"""Atomic checkpoint files and the random-number-generator states they carry.

``atomic_save`` writes to a temporary file in the destination's directory, flushes and fsyncs
it, then ``os.replace``-s it over the destination (and fsyncs the directory), so a run killed at
any moment leaves either the previous checkpoint or the new one, never a torn file. Checkpoints
hold only tensors and plain Python values and load with ``torch.load(weights_only=True)``.
"""

import json
import os
import random
import tempfile

import numpy as np
import torch

from .errors import CheckpointError

__all__ = ["atomic_save", "atomic_write_text", "load_checkpoint", "load_run_checkpoint", "capture_rng_states",
           "restore_rng_states", "checkpoint_path", "CheckpointError", "CHECKPOINT_NAME", "RUN_CHECKPOINT_KEYS"]

CHECKPOINT_NAME = "checkpoint.pt"
# What a training run's checkpoint holds (``fastcnf.training.trainer.Trainer.state_dict``).
RUN_CHECKPOINT_KEYS = ("format", "config", "dim", "iteration", "elapsed", "model", "optimization", "sampler", "rng",
                       "validation")


def _fsync_directory(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path, write):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.chmod(temporary, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def atomic_save(obj, path):
    """``torch.save(obj)`` to ``path`` atomically (see the module docstring)."""
    _atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(text, path):
    _atomic_write(path, lambda handle: handle.write(text.encode()))


def checkpoint_path(location):
    """The checkpoint file for a run directory or a file path."""
    return os.path.join(location, CHECKPOINT_NAME) if os.path.isdir(location) else location


def load_checkpoint(location, map_location="cpu"):
    """The checkpoint dictionary at ``location`` (a run directory or a .pt file)."""
    path = checkpoint_path(location)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {location!r} (expected {path}).")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is reported the same way
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"cannot read checkpoint {path!r} (truncated, or not a fastcnf checkpoint): "
                              f"{first_line}") from None


def load_run_checkpoint(location, map_location="cpu"):
    """The checkpoint of a training run at ``location``, after checking it is one (a dictionary with
    ``RUN_CHECKPOINT_KEYS`` and a ``config`` dictionary)."""
    checkpoint = load_checkpoint(location, map_location)
    path = checkpoint_path(location)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path!r} is not a fastcnf training checkpoint: it holds a {type(checkpoint).__name__}, "
                              "not a dictionary.")
    missing = [key for key in RUN_CHECKPOINT_KEYS if key not in checkpoint]
    if missing or not isinstance(checkpoint["config"], dict):
        what = f"no {missing[0]!r} entry" if missing else "its 'config' entry is not a dictionary"
        raise CheckpointError(f"{path!r} is not a fastcnf training checkpoint: {what}.")
    return checkpoint


def capture_rng_states(device=None):
    """torch (CPU and CUDA), numpy-global and python ``random`` states as tensors and plain values.

    For a CUDA ``device`` the state of that device's generator is also kept by itself, so that
    ``restore_rng_states`` can put it on another process's device (multi-process training keeps
    the generators of all processes in step; rank 0 saves for all).
    """
    name, keys, position, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if device is not None and torch.device(device).type == "cuda":
        states["device"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states, device=None):
    """Inverse of ``capture_rng_states``; a saved device state goes to the CUDA ``device`` given here."""
    torch.set_rng_state(states["torch"])
    numpy_state = states["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    version, internal, gauss = json.loads(states["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "device" in states and device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(states["device"], device)
