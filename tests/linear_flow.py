"""Shared test helper: a torchdiffeq-style user module f(t, z) = z A^T (not a fastcnf net), whose flow has a
matrix-exponential solution."""

import torch
import torch.nn as nn


class Linear(nn.Module):
    """f(t, z) = z A^T with A (D, D) a float64 parameter."""

    def __init__(self, matrix):
        super().__init__()
        self.matrix = nn.Parameter(torch.as_tensor(matrix, dtype=torch.float64))

    def forward(self, t, z):
        return z @ self.matrix.t()
