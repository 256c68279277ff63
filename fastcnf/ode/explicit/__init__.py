"""Explicit Runge-Kutta methods: tableaus (data), the stepper, the adaptive host loop, the device loop
and the fixed-grid loop shared by every fixed-grid method."""
