"""Description of a time-dependent MLP that fused kernels can evaluate directly.

A network that can describe itself this way at a time t (``fastcnf.cnf.nets.ODEnet.mlp_spec(t)``,
an MLP of affine layers with ``time_concat="none"``) lets the divergence estimators use the fused
divergence pass of ``fastcnf.kernels`` (``tangent_mlp``, or the Triton Hutchinson kernel) instead
of autograd vector-Jacobian products per evaluation.

    h_0 = z                                            (B, D)
    h_k = act(W_k [t, h_{k-1}] + b_k)   k < L          time column first, when concatenated
    f   = W_L [t, h_{L-1}] + b_L                       (B, D)

``time_concat`` says which layers see the time column: ``"all"`` (FFJORD's ConcatLinear
layers), ``"first"`` (only the input layer) or ``"none"`` (autonomous dynamics).
"""

from dataclasses import dataclass

__all__ = ["MLPSpec", "ACTIVATIONS", "TIME_CONCAT"]

ACTIVATIONS = ("tanh", "softplus", "sigmoid", "swish", "elu")
TIME_CONCAT = ("all", "first", "none")


@dataclass(frozen=True)
class MLPSpec:
    """Weights (out_k, in_k [+1 for the time column]) and biases (out_k,) of each layer."""

    weights: tuple
    biases: tuple
    activation: str
    time_concat: str = "all"

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}.")
        if self.time_concat not in TIME_CONCAT:
            raise ValueError(f"time_concat must be one of {TIME_CONCAT}, got {self.time_concat!r}.")
        if len(self.weights) != len(self.biases) or not self.weights:
            raise ValueError("an MLPSpec needs one bias per weight and at least one layer.")

    def has_time(self, layer):
        return self.time_concat == "all" or (self.time_concat == "first" and layer == 0)
