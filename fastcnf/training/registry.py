"""The training methods by name (``--method``), registered explicitly in one place."""

from .jko_schedule import JKOIFlow
from .training_methods import FFJORD, RNODE, TOFLOW, TPR

__all__ = ["TRAINING_METHODS", "register_training_method"]

TRAINING_METHODS = {cls.name: cls for cls in (FFJORD, RNODE, TPR, TOFLOW, JKOIFlow)}


def register_training_method(cls):
    """Make the ``TrainingMethod`` subclass ``cls`` available as ``--method cls.name`` (for extensions)."""
    TRAINING_METHODS[cls.name] = cls
    return cls
