"""Norms used to measure the scaled local error of an adaptive step.

A norm maps a tensor (or, for tuple states, a tuple of tensors) to a scalar. The built-in norms
are also described by ``SegmentNorm``: the flat state is cut into segments, each segment gets
an RMS norm and the result is the maximum over the segments that are not skipped. That form
covers torchdiffeq's default norm (one segment), its mixed norm for tuple states (one segment
per tensor) and its adjoint norm and seminorm, and it is what the fused C++ error-ratio
routine evaluates without building any intermediate tensor.
"""

from dataclasses import dataclass

import torch

__all__ = ["rms_norm", "linf_norm", "mixed_norm", "SegmentNorm", "widened"]


def widened(tensor):
    """``tensor`` in float32 if it is float16/bfloat16, else itself: squares of scaled errors overflow
    float16 (its largest value is 65504), so norms and step-size estimates of half states are taken
    in float32."""
    return tensor.float() if tensor.is_floating_point() and tensor.element_size() < 4 else tensor


def rms_norm(tensor):
    """Root-mean-square of ``tensor`` (any shape) as a 0-dim tensor (float32 for half dtypes)."""
    return widened(tensor).abs().pow(2).mean().sqrt()


def linf_norm(tensor):
    """Largest absolute entry of ``tensor``."""
    return tensor.abs().max()


def mixed_norm(tensors):
    """Largest RMS norm over a tuple of tensors (torchdiffeq's default for tuple states)."""
    if len(tensors) == 0:
        return 0.0
    return max(rms_norm(tensor) for tensor in tensors)


@dataclass(frozen=True)
class SegmentNorm:
    """Max over segments of the RMS norm of a flat vector.

    ``ends`` are the exclusive end offsets of consecutive segments starting at 0; segments
    whose ``skip`` flag is set do not count (seminorm). Empty segments contribute 0.
    """

    ends: tuple
    skip: tuple

    @classmethod
    def single(cls, numel):
        return cls(ends=(numel,), skip=(False,))

    @classmethod
    def from_sizes(cls, sizes, skip=None):
        ends, total = [], 0
        for size in sizes:
            total += int(size)
            ends.append(total)
        skip = tuple(bool(s) for s in skip) if skip is not None else (False,) * len(ends)
        return cls(ends=tuple(ends), skip=skip)

    def __call__(self, flat):
        """Reference evaluation on a flat tensor (used off the fused path)."""
        flat = widened(flat.reshape(-1))
        start, value = 0, flat.new_zeros((), dtype=flat.abs().dtype)
        for end, skip in zip(self.ends, self.skip):
            if not skip and end > start:
                value = torch.maximum(value, rms_norm(flat[start:end]))
            start = end
        return value
