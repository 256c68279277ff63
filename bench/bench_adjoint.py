"""Training step of a 2-D CNF through the adjoint: fastcnf.odeint_adjoint vs torchdiffeq.odeint_adjoint.

FFJORD-style CNF (concat-time MLP 2-64-64-64-2, tanh, weights x4) on 8-Gaussians, batch 512,
dopri5 at rtol=atol=1e-5 on [0, 1]: forward solve plus the backward pass of the negative
log-likelihood, with exact divergence and with Hutchinson's estimator. The "+ dL/dT" cases also
differentiate the output times (a trainable terminal time, TO-FLOW): torchdiffeq evaluates the
dynamics once more per output time for that, fastcnf reads it off the backward solve.
"""

import pytest

from .libraries import LIBRARIES
from .measure import run_benchmark
from .workloads import SolverConfig, Workload, ffjord_2d_problem

ADJOINT = SolverConfig("dopri5", rtol=1e-5, atol=1e-5, adjoint=True)


def _workloads():
    workloads = []
    for divergence in ("exact", "hutchinson"):
        for time_gradient in (False, True):
            suffix = " + dL/dT" if time_gradient else ""
            workloads.append(Workload(
                name=f"cnf2d {divergence}-div B=512 adjoint{suffix}",
                build=ffjord_2d_problem(512, divergence=divergence, time_gradient=time_gradient),
                solver=ADJOINT, backprop=True, accuracy=5e-3, state="(512, 2) + (512, 1)"))
    return workloads


WORKLOADS = {workload.id: workload for workload in _workloads()}


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_adjoint(benchmark, workload, library):
    run_benchmark(benchmark, WORKLOADS[workload], library)
