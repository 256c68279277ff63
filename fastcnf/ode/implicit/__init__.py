"""Implicit Runge-Kutta methods: tableaus (data), the simplified-Newton stage solver, Jacobians and
gradients through the stage solves by the implicit function theorem."""
