"""Datasets: deterministic by seed, right shapes and statistics, resumable samplers, clear errors."""

import math

import numpy as np
import pytest
import torch

from fastcnf.training.data import (
    TOY_DATASETS,
    DataError,
    EpochSampler,
    ToyDataset,
    load_dataset,
    load_digits,
    load_table,
    split_rows,
    toy_sample,
)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toys_are_deterministic_by_seed_and_bounded(name):
    first = toy_sample(name, 4000, 3)
    assert first.shape == (4000, 2) and first.dtype == np.float64
    np.testing.assert_array_equal(first, toy_sample(name, 4000, np.random.default_rng(3)))
    assert not np.array_equal(first, toy_sample(name, 4000, 4))
    assert np.isfinite(first).all() and np.abs(first).max() < 6.5
    assert 0.8 < first.std() < 3.5  # spread over the [-4, 4]^2 plotting window
    generator = torch.Generator().manual_seed(5)
    again = torch.Generator().manual_seed(5)
    np.testing.assert_array_equal(toy_sample(name, 10, generator), toy_sample(name, 10, again))


def test_eight_gaussians_statistics():
    points = toy_sample("8gaussians", 40000, 0)
    angles = np.round(np.arctan2(points[:, 1], points[:, 0]) / (math.pi / 4)) % 8
    counts = np.bincount(angles.astype(int), minlength=8)
    assert counts.min() > 4500 and counts.max() < 5500  # equal weights
    centers = 2 * math.sqrt(2) * np.stack([np.cos(angles * math.pi / 4), np.sin(angles * math.pi / 4)], 1)
    np.testing.assert_allclose((points - centers).std(0), [0.35, 0.35], rtol=0.03)
    np.testing.assert_allclose(points.mean(0), [0, 0], atol=0.05)


def test_checkerboard_fills_only_the_black_cells_uniformly():
    points = toy_sample("checkerboard", 40000, 0)
    cells = np.floor((points + 4) / 2).astype(int)
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all() and (cells >= 0).all() and (cells <= 3).all()
    counts = np.bincount(cells[:, 1] * 4 + cells[:, 0], minlength=16)
    assert (counts[counts > 0] > 4500).all() and np.count_nonzero(counts) == 8


def test_rings_and_circles_radii():
    radii = np.linalg.norm(toy_sample("rings", 20000, 0), axis=1)
    levels = np.bincount(np.clip(np.round(radii / 0.9).astype(int), 0, 5), minlength=6)
    assert levels[0] == 0 and levels[5] == 0 and levels[1:5].min() > 4500
    circle_radii = np.linalg.norm(toy_sample("circles", 20000, 0), axis=1)
    assert np.mean(np.abs(circle_radii - 1.5) < 0.5) + np.mean(np.abs(circle_radii - 3.0) < 0.5) > 0.999


def test_toy_dataset_splits_and_sampler_resume():
    data = ToyDataset("moons", seed=2)
    assert data.dim == 2 and data.validation.shape == (2000, 2) and data.test.shape == (5000, 2)
    assert data.validation.dtype == torch.float32
    torch.testing.assert_close(ToyDataset("moons", seed=2).test, data.test)
    sampler = data.sampler(64, seed=9)
    sampler.next()
    state = sampler.state_dict()
    expected = [sampler.next() for _ in range(3)]
    resumed = data.sampler(64, seed=123)
    resumed.load_state_dict(state)
    for batch in expected:
        torch.testing.assert_close(resumed.next(), batch, rtol=0, atol=0)


def test_epoch_sampler_visits_every_row_once_per_epoch_and_resumes():
    rows = np.arange(20, dtype=np.float64)[:, None]
    sampler = EpochSampler(rows, 5, seed=0)
    epoch = torch.cat([sampler.next() for _ in range(4)])
    assert sorted(epoch[:, 0].tolist()) == list(range(20))
    state = sampler.state_dict()
    expected = [sampler.next() for _ in range(6)]  # crosses into the next epoch
    resumed = EpochSampler(rows, 5, seed=1)
    resumed.load_state_dict(state)
    for batch in expected:
        torch.testing.assert_close(resumed.next(), batch, rtol=0, atol=0)
    with pytest.raises(DataError, match="batch size 30 exceeds the 20 training rows"):
        EpochSampler(rows, 30, seed=0)


def test_digits_are_dequantized_split_and_deterministic():
    digits = load_digits(seed=0)
    assert digits.dim == 64 and len(digits.train) + len(digits.validation) + len(digits.test) == 1797
    batch = digits.sampler(100, seed=0).next()
    assert batch.shape == (100, 64) and float(batch.min()) > 0 and float(batch.max()) < 1
    # dequantization: level k of 17 maps into [k/17, (k+1)/17)
    levels = torch.floor(batch * 17)
    assert torch.equal(levels, levels.round()) and float(levels.max()) == 16
    torch.testing.assert_close(load_digits(seed=0).test, digits.test)
    logit = load_digits(seed=0, logit=True)
    assert torch.isfinite(logit.test).all() and float(logit.test.abs().max()) < math.log(0.95 / 0.05) + 1e-4
    assert load_dataset("digits", seed=0).name == "digits"


def test_user_tables_are_standardized_and_split(tmp_path):
    rng = np.random.default_rng(0)
    table = rng.normal(5.0, 3.0, size=(200, 3))
    np.save(tmp_path / "table.npy", table)
    with open(tmp_path / "table.csv", "w") as handle:
        handle.write("a,b,c\n" + "\n".join(",".join(repr(float(v)) for v in row) for row in table) + "\n")
    from_npy, from_csv = load_table(str(tmp_path / "table.npy")), load_dataset(str(tmp_path / "table.csv"))
    assert from_npy.dim == 3 and len(from_npy.train) == 160 and from_npy.validation.shape == (20, 3)
    np.testing.assert_allclose(from_npy.train.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(from_npy.train.std(0), 1, atol=1e-12)
    torch.testing.assert_close(from_npy.test, from_csv.test)
    train, validation, test = split_rows(table, seed=0)
    assert sorted(map(tuple, np.concatenate([train, validation, test]))) == sorted(map(tuple, table))


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("1,2\n3,nan\n4,5\n", "NaN or Inf"),
    ("1,2\n3,4\n", "at least 3 rows"),
    ("1,2\n3,x\n5,6\n", "cannot read"),
])
def test_bad_tables_are_rejected(tmp_path, content, message):
    path = tmp_path / "data.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_table(str(path))


def test_unknown_names_are_rejected():
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="unknown toy dataset"):
        toy_sample("spiral", 3, 0)
    with pytest.raises(DataError, match="must end in .npy or .csv"):
        load_table("data.txt")
