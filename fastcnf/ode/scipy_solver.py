"""``method="scipy_solver"``: hand the solve to ``scipy.integrate.solve_ivp`` (no gradients)."""

import numpy as np
import torch
from scipy.integrate import solve_ivp

from ..errors import FastCNFError
from ..stats import record_solve

__all__ = ["ScipySolver"]


class ScipySolver:
    """Solve on the CPU with scipy (``solver`` is any ``solve_ivp`` method name, default LSODA).

    ``norm``, ``grid_points`` and ``eps`` are accepted and ignored, as in torchdiffeq.
    """

    OPTIONS = frozenset({"solver", "min_step", "max_step", "norm", "grid_points", "eps"})
    CALLBACKS = frozenset()

    def __init__(self, dynamics, y0, rtol, atol, *, solver="LSODA", min_step=0.0, max_step=np.inf, norm=None,
                 grid_points=None, eps=None):
        self.dynamics = dynamics
        self.y0 = y0
        self.rtol = rtol.detach().cpu().numpy() if isinstance(rtol, torch.Tensor) else rtol
        self.atol = atol.detach().cpu().numpy() if isinstance(atol, torch.Tensor) else atol
        self.solver = solver
        self.min_step, self.max_step = min_step, max_step

    def _numpy_dynamics(self, t, y):
        with torch.no_grad():
            state = torch.as_tensor(y, dtype=self.y0.dtype).to(self.y0.device)
            return self.dynamics(float(t), state).detach().cpu().numpy()

    def integrate(self, t):
        if t.numel() == 1:
            return self.y0.detach()[None]
        times = t.detach().cpu().numpy()
        extra = {"min_step": self.min_step} if self.solver == "LSODA" or self.min_step else {}
        try:
            result = solve_ivp(self._numpy_dynamics, t_span=[times.min(), times.max()],
                               y0=self.y0.detach().cpu().numpy(), t_eval=times, method=self.solver,
                               rtol=self.rtol, atol=self.atol, max_step=self.max_step, **extra)
        finally:
            record_solve(self.dynamics)
        if not result.success:
            raise FastCNFError(f"scipy_solver ({self.solver}) failed: {result.message}")
        return torch.as_tensor(result.y.T.copy()).to(self.y0.device, self.y0.dtype)
