"""Implicit fixed-grid methods: time per step, fastcnf against torchdiffeq, in one process.

Workload: independent rows of the stiff linear system y' = A y (A is 8 x 8 with eigenvalues
log-spaced in [-1e4, -1]), state (B, 8) with N = B * 8 = 8, 64 and 512, float64, step size
0.01 (|lambda| dt up to 100), no autograd. fastcnf runs with its default options (dense
Jacobian) and with ``jacobian_structure="block_diagonal"``; torchdiffeq with its defaults.

torchdiffeq 0.2.5 has no implicit methods, so its cases skip unless a torchdiffeq with them
(its repository head) is first on the path:

    PYTHONPATH=/path/to/torchdiffeq-head pytest bench/bench_implicit.py --benchmark-enable

Each case integrates ``steps`` steps per call (``extra_info``); time per step is the call
time divided by it. torchdiffeq's Broyden iteration needs seconds per step at N = 512 for the
fully implicit methods, so those cases run one step, once.
"""

from dataclasses import dataclass

import pytest
import torch
import torchdiffeq
from torchdiffeq._impl.odeint import SOLVERS

import fastcnf

METHODS = ["implicit_euler", "trbdf2", "gl4", "radauIIA5"]
FULLY_IMPLICIT = {"gl4", "radauIIA5"}
SIZES = [8, 64, 512]
STEP = 0.01
WIDTH = 8


@dataclass(frozen=True)
class Plan:
    steps: int
    rounds: int
    warmup_rounds: int


def _plan(library, method, size):
    if library == "torchdiffeq" and size == 512:
        return Plan(steps=1, rounds=1, warmup_rounds=0)
    if library == "torchdiffeq" and size == 64 and method in FULLY_IMPLICIT:
        return Plan(steps=2, rounds=3, warmup_rounds=1)
    return Plan(steps=10, rounds=5, warmup_rounds=1)


def _stiff_rows(size):
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(WIDTH, WIDTH, generator=generator, dtype=torch.float64))
    matrix = q @ torch.diag(-torch.logspace(0, 4, WIDTH, dtype=torch.float64)) @ q.T
    y0 = torch.randn(size // WIDTH, WIDTH, generator=generator, dtype=torch.float64)
    return (lambda t, y: y @ matrix.T), y0


LIBRARIES = {
    "torchdiffeq": (torchdiffeq, {}),
    "fastcnf": (fastcnf, {}),
    "fastcnf-block": (fastcnf, {"jacobian_structure": "block_diagonal"}),
}


@pytest.mark.parametrize("library", list(LIBRARIES))
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("method", METHODS)
def test_time_per_step(benchmark, method, size, library):
    if library == "torchdiffeq" and method not in SOLVERS:
        pytest.skip(f"torchdiffeq {torchdiffeq.__version__} has no {method!r}")
    module, options = LIBRARIES[library]
    plan = _plan(library, method, size)
    func, y0 = _stiff_rows(size)
    t = torch.tensor([0.0, plan.steps * STEP], dtype=torch.float64)
    options = dict(step_size=STEP, **options)

    def solve():
        with torch.no_grad():
            return module.odeint(func, y0, t, method=method, options=options)

    benchmark.group = f"{method} N={size}"
    benchmark.extra_info.update(steps=plan.steps, method=method, size=size, library=library)
    solution = benchmark.pedantic(solve, rounds=plan.rounds, iterations=1, warmup_rounds=plan.warmup_rounds)
    assert bool(torch.isfinite(solution).all())
