"""Triton kernels of fastcnf (``fastcnf.kernels``; importing a kernel module needs triton).

* ``rk_stage``: fused Runge-Kutta stage combination and scaled error ratio (used by the solver
  with the Triton backend).
* ``hutchinson``: f and the Hutchinson quadratic form of an MLP in one fused pass.
"""
