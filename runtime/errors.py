"""Runtime errors a user can cause. Each renders as one line; the CLI never shows a traceback."""
from __future__ import annotations


class RunError(Exception):
    """A user-facing runtime failure. `exit_code` 2 means CLI misuse, 1 a failed run."""

    exit_code = 1


class UsageError(RunError):
    """Bad flags, a bad --set, a run directory that is not one."""

    exit_code = 2


class DataError(UsageError):
    """--data that matches nothing, unreadable or too small input."""


class CheckpointError(RunError):
    """A corrupt checkpoint, or one made by a different model."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint that cannot be read (as opposed to one made by another model)."""


class NonFiniteLossError(RunError):
    """The loss became NaN or inf; the last good checkpoint is left as it was."""


class Interrupted(RunError):
    """SIGINT / SIGTERM: a checkpoint was saved, then the run stopped."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
