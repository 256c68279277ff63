"""Datasets for CNF training: 2-D toys, sklearn's digits and the user's tabular files.

Nothing is downloaded. Every random draw comes from a ``numpy.random.Generator`` owned by the
dataset or its batch sampler, so data are deterministic by seed and a sampler's position can be
saved and restored (``state_dict`` / ``load_state_dict``) for bit-exact resumption.

    toy_sample(name, n, rng)      (n, 2) float64 points of a 2-D toy, roughly inside [-4, 4]^2
    load_dataset(spec, seed)      a Dataset: toy name, "digits", or a path to .npy / .csv

A ``Dataset`` has ``name``, ``dim``, ``validation`` and ``test`` (float32 tensors) and
``sampler(batch_size, seed)`` returning an endless ``BatchSampler``.
"""

import math
import os

import numpy as np
import torch

from .errors import DataError

__all__ = ["TOY_DATASETS", "toy_sample", "to_numpy_generator", "Dataset", "ToyDataset", "ArrayDataset",
           "ToySampler", "EpochSampler", "load_dataset", "load_digits", "load_table", "split_rows", "DataError",
           "DATASET_NAMES"]



# ----------------------------------------------------------------------------- 2-D toys
def _eight_gaussians(n, rng):
    angles = rng.integers(0, 8, n) * (math.pi / 4)
    centers = 2.0 * math.sqrt(2.0) * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return centers + 0.35 * rng.standard_normal((n, 2))


def _checkerboard(n, rng):
    # a 4x4 board of 2x2 cells on [-4, 4]^2; the 8 cells with even (row + column) are filled
    cell = rng.integers(0, 8, n)
    row = cell // 2
    column = 2 * (cell % 2) + (row % 2)
    corner = np.stack([column, row], axis=1) * 2.0 - 4.0
    return corner + 2.0 * rng.random((n, 2))


def _two_spirals(n, rng):
    turn = np.sqrt(rng.random(n)) * 3.0 * math.pi
    arm = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    points = arm[:, None] * np.stack([turn * np.cos(turn), turn * np.sin(turn)], axis=1)
    return points / 2.5 + 0.15 * rng.standard_normal((n, 2))


def _moons(n, rng):
    angle = rng.random(n) * math.pi
    upper = rng.random(n) < 0.5
    x = np.where(upper, np.cos(angle), 1.0 - np.cos(angle))
    y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
    points = np.stack([x - 0.5, y - 0.25], axis=1) * 2.5
    return points + 0.2 * rng.standard_normal((n, 2))


def _circles(n, rng):
    angle = rng.random(n) * 2 * math.pi
    radius = np.where(rng.random(n) < 0.5, 3.0, 1.5)
    points = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return points + 0.12 * rng.standard_normal((n, 2))


def _pinwheel(n, rng, arms=5, radial_std=0.3, tangential_std=0.08, twist=0.25):
    arm = rng.integers(0, arms, n)
    radial = 1.0 + radial_std * rng.standard_normal(n)
    tangential = tangential_std * rng.standard_normal(n)
    angle = arm * (2 * math.pi / arms) + twist * np.exp(radial)
    cos, sin = np.cos(angle), np.sin(angle)
    points = np.stack([cos * radial - sin * tangential, sin * radial + cos * tangential], axis=1)
    return 2.0 * points


def _rings(n, rng):
    radius = 0.9 * (1 + rng.integers(0, 4, n))
    angle = rng.random(n) * 2 * math.pi
    points = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return points + 0.08 * rng.standard_normal((n, 2))


def _swissroll(n, rng):
    turn = 1.5 * math.pi * (1 + 2 * rng.random(n))
    points = np.stack([turn * np.cos(turn), turn * np.sin(turn)], axis=1) / 3.5
    return points + 0.1 * rng.standard_normal((n, 2))


TOY_GENERATORS = {
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "2spirals": _two_spirals,
    "moons": _moons,
    "circles": _circles,
    "pinwheel": _pinwheel,
    "rings": _rings,
    "swissroll": _swissroll,
}
TOY_DATASETS = tuple(TOY_GENERATORS)
DATASET_NAMES = TOY_DATASETS + ("digits",)


def to_numpy_generator(source):
    """A ``numpy.random.Generator`` from an int seed, a numpy Generator or a torch.Generator."""
    if isinstance(source, np.random.Generator):
        return source
    if isinstance(source, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2 ** 62, (), generator=source)))
    if isinstance(source, (int, np.integer)) and not isinstance(source, bool):
        return np.random.default_rng(int(source))
    raise TypeError(f"expected an int seed, numpy Generator or torch.Generator, got {type(source).__name__}.")


def toy_sample(name, n, rng):
    """``n`` points (n, 2) float64 of the toy ``name`` drawn from ``rng`` (see ``to_numpy_generator``)."""
    if name not in TOY_GENERATORS:
        raise DataError(f"unknown toy dataset {name!r}; choose one of {', '.join(TOY_DATASETS)}.")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}.")
    return TOY_GENERATORS[name](int(n), to_numpy_generator(rng))


# ----------------------------------------------------------------------------- samplers
class ToySampler:
    """Endless batches of fresh toy samples from the sampler's own generator."""

    def __init__(self, name, batch_size, seed):
        self.name, self.batch_size = name, batch_size
        self.rng = np.random.default_rng(seed)

    def next(self):
        return torch.from_numpy(toy_sample(self.name, self.batch_size, self.rng)).float()

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]


class EpochSampler:
    """Shuffled mini-batches of a fixed array, epoch after epoch, with an optional per-batch transform.

    ``transform(batch, rng)`` (e.g. dequantization noise) draws from the sampler's generator.
    """

    def __init__(self, array, batch_size, seed, transform=None):
        if batch_size > len(array):
            raise DataError(f"batch size {batch_size} exceeds the {len(array)} training rows.")
        self.array, self.batch_size, self.transform = array, batch_size, transform
        self.rng = np.random.default_rng(seed)
        self.order, self.position = self.rng.permutation(len(array)), 0

    def next_rows(self):
        """Row indices (numpy) of the next batch; the order is reshuffled at every new epoch."""
        if self.position + self.batch_size > len(self.order):
            self.order, self.position = self.rng.permutation(len(self.array)), 0
        rows = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return rows

    def next(self):
        batch = self.array[self.next_rows()]
        if self.transform is not None:
            batch = self.transform(batch, self.rng)
        return torch.from_numpy(np.ascontiguousarray(batch)).float()

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state, "order": torch.from_numpy(self.order.copy()),
                "position": self.position}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]
        self.order, self.position = state["order"].numpy().copy(), int(state["position"])


# ----------------------------------------------------------------------------- datasets
class Dataset:
    """Common shape of the datasets: name, dim, fixed validation/test tensors, a batch sampler."""

    name = ""
    dim = 0
    validation = None
    test = None

    def sampler(self, batch_size, seed):
        raise NotImplementedError


class ToyDataset(Dataset):
    """A 2-D toy: endless fresh training samples, fixed validation and test sets."""

    def __init__(self, name, seed=0, num_validation=2000, num_test=5000):
        if name not in TOY_GENERATORS:
            raise DataError(f"unknown toy dataset {name!r}; choose one of {', '.join(TOY_DATASETS)}.")
        self.name, self.dim = name, 2
        seeds = np.random.SeedSequence(seed).spawn(2)
        self.validation = torch.from_numpy(toy_sample(name, num_validation, np.random.default_rng(seeds[0]))).float()
        self.test = torch.from_numpy(toy_sample(name, num_test, np.random.default_rng(seeds[1]))).float()

    def sampler(self, batch_size, seed):
        return ToySampler(self.name, batch_size, seed)


class ArrayDataset(Dataset):
    """Rows of a fixed table split into train/validation/test; see ``load_digits`` and ``load_table``.

    ``transform(batch, rng)`` is applied to every training batch and once (with a fixed seed) to
    the validation and test rows.
    """

    def __init__(self, name, train, validation, test, seed=0, transform=None):
        self.name, self.dim = name, train.shape[1]
        self.train, self.transform = train, transform
        rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(3)[2])
        if transform is not None:
            validation, test = transform(validation, rng), transform(test, rng)
        self.validation = torch.from_numpy(np.ascontiguousarray(validation)).float()
        self.test = torch.from_numpy(np.ascontiguousarray(test)).float()

    def sampler(self, batch_size, seed):
        return EpochSampler(self.train, batch_size, seed, self.transform)


def split_rows(array, seed, validation_fraction=0.1, test_fraction=0.1):
    """(train, validation, test) rows of ``array`` by a permutation seeded with ``seed``."""
    if not (0 < validation_fraction < 1 and 0 < test_fraction < 1 and validation_fraction + test_fraction < 1):
        raise DataError("validation and test fractions must be in (0, 1) and sum to less than 1.")
    order = np.random.default_rng(seed).permutation(len(array))
    n_val = max(1, int(round(validation_fraction * len(array))))
    n_test = max(1, int(round(test_fraction * len(array))))
    if len(array) - n_val - n_test < 1:
        raise DataError(f"{len(array)} rows are too few to split into train/validation/test.")
    return array[order[n_val + n_test:]], array[order[:n_val]], array[order[n_val:n_val + n_test]]


class _Dequantize:
    """x in {0..levels-1} -> (x + u) / levels, u ~ U(0, 1); optionally logit(alpha + (1 - 2 alpha) y)."""

    def __init__(self, levels, logit, alpha):
        self.levels, self.logit, self.alpha = levels, logit, alpha

    def __call__(self, batch, rng):
        y = (batch + rng.random(batch.shape)) / self.levels
        if self.logit:
            y = self.alpha + (1 - 2 * self.alpha) * y
            y = np.log(y) - np.log1p(-y)
        return y


def load_digits(seed=0, logit=False, alpha=0.05):
    """sklearn's 8x8 digits (1797 x 64, levels 0..16) dequantized to (0, 1), optionally logit-transformed."""
    from sklearn.datasets import load_digits as sklearn_digits

    images = sklearn_digits().data.astype(np.float64)
    train, validation, test = split_rows(images, seed)
    return ArrayDataset("digits-logit" if logit else "digits", train, validation, test, seed,
                        _Dequantize(17.0, logit, alpha))


def _read_table(path):
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist.")
    if path.endswith(".npy"):
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as error:
            raise DataError(f"cannot read {path!r} as a numeric .npy array: {error}") from None
    with open(path) as handle:
        first = handle.readline()
    try:
        [float(v) for v in first.strip().split(",")]
        skip = 0
    except ValueError:
        skip = 1  # a header row
    try:
        return np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2)
    except ValueError as error:
        raise DataError(f"cannot read {path!r} as a numeric CSV table: {error}") from None


def load_table(path, seed=0, standardize=True):
    """A user table (.npy 2-D array, or .csv with an optional header row) split by ``seed``.

    With ``standardize`` every column is shifted and scaled by the training rows' mean and std.
    """
    if not path.endswith((".npy", ".csv")):
        raise DataError(f"data file {path!r} must end in .npy or .csv.")
    array = np.asarray(_read_table(path), dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 3 or array.shape[1] < 1:
        raise DataError(f"{path!r} must hold a 2-D table with at least 3 rows, got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise DataError(f"{path!r} contains NaN or Inf values.")
    train, validation, test = split_rows(array, seed)
    if standardize:
        mean, std = train.mean(axis=0), train.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        train, validation, test = ((part - mean) / std for part in (train, validation, test))
    return ArrayDataset(os.path.basename(path), train, validation, test, seed)


def load_dataset(spec, seed=0, logit=False):
    """A toy name, ``"digits"`` (``logit`` applies the logit transform) or a .npy/.csv path."""
    if spec in TOY_GENERATORS:
        return ToyDataset(spec, seed)
    if spec == "digits":
        return load_digits(seed, logit=logit)
    if spec.endswith((".npy", ".csv")):
        return load_table(spec, seed)
    raise DataError(f"unknown dataset {spec!r}; use one of {', '.join(DATASET_NAMES)} or a .npy/.csv file.")
