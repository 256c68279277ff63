"""Errors of the training application; the command line turns each into one line and exit code 2
(``TrainingDiverged`` and ``TrainingStalled``: exit code 1; ``TrainingInterrupted``: 130, as for Ctrl-C)."""

__all__ = ["ConfigError", "DataError", "CheckpointError", "TrainingDiverged", "TrainingStalled", "TrainingInterrupted"]


class ConfigError(ValueError):
    """A training setting that cannot be used, with the reason."""


class DataError(ValueError):
    """A dataset name or file that cannot be used, with the reason."""


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be read, with the path."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingStalled(RuntimeError):
    """An iteration's solves exceeded the evaluation budget (``--max-nfe``)."""


class TrainingInterrupted(Exception):
    """The run was asked to stop (Ctrl-C) and saved a checkpoint at ``iteration`` first."""

    def __init__(self, iteration, out):
        super().__init__(f"interrupted at iteration {iteration}; checkpoint saved in {out} (continue with --out {out} "
                         "--resume).")
        self.iteration, self.out = iteration, out
