"""Benchmarks of fastcnf against torchdiffeq (and torchode): workloads, harness and report."""
