"""Errors of the training application; the command line turns each into one line and exit code 2
(``TrainingDiverged``: exit code 1)."""

__all__ = ["ConfigError", "DataError", "CheckpointError", "TrainingDiverged"]


class ConfigError(ValueError):
    """A training setting that cannot be used, with the reason."""


class DataError(ValueError):
    """A dataset name or file that cannot be used, with the reason."""


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be read, with the path."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""
