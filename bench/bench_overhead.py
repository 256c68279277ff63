"""Solver overhead: trivial dynamics on tiny to large states, and the forward pass of a 2-D CNF.

(a) dy/dt = -0.5 y on states (4,), (512, 2), (4096, 64) over [0, 10]: dopri5 at rtol=atol=1e-6
    (15 steps) and rk4 with step 0.25 (40 steps). The dynamics cost almost nothing, so the time
    is the solver's own per-step overhead; the report subtracts the time of the same number of
    bare calls.
(b) FFJORD-style 2-D CNF (concat-time MLP 2-64-64-64-2, tanh, weights x4), batch 512, exact
    divergence, dopri5 at rtol=atol=1e-5 on [0, 1].
Each in inference (no_grad) and backprop (loss gradient through the solver) mode.
"""

import pytest

from .libraries import LIBRARIES
from .measure import run_benchmark
from .workloads import SolverConfig, Workload, decay_problem, ffjord_2d_problem

DOPRI5_DECAY = SolverConfig("dopri5", rtol=1e-6, atol=1e-6)
RK4_DECAY = SolverConfig("rk4", rtol=1e-6, atol=1e-6, options=dict(step_size=0.25))
DOPRI5_CNF = SolverConfig("dopri5", rtol=1e-5, atol=1e-5)
DECAY_SHAPES = ((4,), (512, 2), (4096, 64))


def _shape_text(shape):
    return "(" + ", ".join(map(str, shape)) + (",)" if len(shape) == 1 else ")")


def _workloads():
    workloads = []
    for backprop in (False, True):
        mode = "backprop" if backprop else "inference"
        for config in (DOPRI5_DECAY, RK4_DECAY):
            for shape in DECAY_SHAPES:
                workloads.append(Workload(
                    name=f"decay {_shape_text(shape)} {config.method} {mode}", build=decay_problem(shape),
                    solver=config, backprop=backprop, accuracy=1e-4, state=_shape_text(shape)))
        workloads.append(Workload(
            name=f"cnf2d exact-div B=512 dopri5 {mode}", build=ffjord_2d_problem(512), solver=DOPRI5_CNF,
            backprop=backprop, accuracy=5e-3, state="(512, 2) + (512, 1)"))
    return workloads


WORKLOADS = {workload.id: workload for workload in _workloads()}


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_overhead(benchmark, workload, library):
    run_benchmark(benchmark, WORKLOADS[workload], library)
