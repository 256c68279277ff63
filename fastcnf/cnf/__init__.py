"""The CNF model library: flows and stacks, divergence estimators, regularizers (RNODE, TPR),
TO-FLOW's trainable terminal time, FFJORD-style networks and the JKO-iFlow model.

Built on ``fastcnf.ode``; nothing here imports the training application.
"""

from .compiled import CompileWarning
from .divergence import (
                         ESTIMATORS,
                         DivergenceEstimate,
                         ExactDivergence,
                         FiniteDifferenceDivergence,
                         HutchinsonDivergence,
                         make_estimator,
)
from .flow import CNF, CNFDynamics, Flow, SequentialFlow, SolverSettings, standard_normal_log_prob
from .jko import (
                  BlockObjective,
                  BlockSolver,
                  JKOFlow,
                  block_objective,
                  geometric_intervals,
                  movement,
                  refinement_selection,
                  relative_movement,
                  reparameterized_intervals,
)
from .mlp_spec import MLPSpec
from .nets import ConcatLinear, ConcatSquashLinear, IgnoreLinear, ODEnet
from .noise import noise_source
from .regularizers import JacobianFrobenius, KineticEnergy, TrajectoryPolynomial
from .toflow import CoordinateDescent, TerminalTime, terminal_times, time_optimizer

__all__ = [
    "CNF", "CNFDynamics", "Flow", "SequentialFlow", "SolverSettings", "standard_normal_log_prob",
    "DivergenceEstimate", "ExactDivergence", "HutchinsonDivergence", "FiniteDifferenceDivergence", "ESTIMATORS",
    "make_estimator", "noise_source", "CompileWarning",
    "KineticEnergy", "JacobianFrobenius", "TrajectoryPolynomial",
    "TerminalTime", "CoordinateDescent", "terminal_times", "time_optimizer",
    "ODEnet", "ConcatLinear", "ConcatSquashLinear", "IgnoreLinear", "MLPSpec",
    "JKOFlow", "BlockSolver", "BlockObjective", "block_objective", "geometric_intervals", "movement",
    "relative_movement", "reparameterized_intervals", "refinement_selection",
]
