"""Atomic checkpoint writes and RNG state capture/restore."""

import os
import random

import numpy as np
import pytest
import torch

from fastcnf.training.checkpoint import (
    CheckpointError,
    atomic_save,
    capture_rng_states,
    checkpoint_path,
    load_checkpoint,
    restore_rng_states,
)


def test_atomic_save_round_trip_and_weights_only_load(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "iteration": 7, "big": 2 ** 100, "nested": [("a", 1.5)]}
    atomic_save(state, str(tmp_path / "checkpoint.pt"))
    loaded = load_checkpoint(str(tmp_path))  # a run directory resolves to its checkpoint.pt
    assert loaded["iteration"] == 7 and loaded["big"] == 2 ** 100
    torch.testing.assert_close(loaded["model"]["w"], torch.arange(4.0))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    atomic_save({"iteration": 1}, path)
    with pytest.raises(Exception):
        atomic_save({"iteration": 2, "bad": lambda: None}, path)  # lambdas cannot be pickled
    assert load_checkpoint(path)["iteration"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_rng_states_restore_every_generator(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    states = capture_rng_states()
    atomic_save({"rng": states}, str(tmp_path / "rng.pt"))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(100)
    np.random.seed(100)
    random.seed(100)
    restore_rng_states(load_checkpoint(str(tmp_path / "rng.pt"))["rng"])
    torch.testing.assert_close(torch.rand(3), expected[0], rtol=0, atol=0)
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_missing_and_corrupt_checkpoints_are_reported(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(str(tmp_path / "nowhere"))
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(str(tmp_path / "broken.pt"))
    assert checkpoint_path(str(tmp_path)) == str(tmp_path / "checkpoint.pt")
