"""The ODE solver library: torchdiffeq's API (``odeint``, ``odeint_adjoint``, ``odeint_event``) plus
``odeint_dense``, on explicit Runge-Kutta (adaptive and fixed grid), Adams, implicit Runge-Kutta and
scipy solvers. ``fastcnf`` re-exports this API; nothing here imports the CNF or training layers."""

from .adjoint import odeint_adjoint
from .odeint import odeint, odeint_dense, odeint_event
from .registry import METHODS, OdeMethod, register_method

__all__ = ["odeint", "odeint_adjoint", "odeint_event", "odeint_dense", "METHODS", "OdeMethod", "register_method"]
