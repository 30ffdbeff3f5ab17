"""User-facing errors: one line that says what is wrong and where, and an exit status."""
from __future__ import annotations


class FtctlError(Exception):
    """An error caused by the user's input (config, paths, data). Printed as one line."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ConfigError(FtctlError):
    """A config key or value is wrong. Raised before any model loads; exit status 2."""

    exit_code = 2


class DataError(FtctlError):
    """A dataset file is missing, unreadable or has the wrong fields."""

    exit_code = 2


class ModelNotFoundError(FtctlError):
    """A model path or hub id cannot be resolved to local files."""

    exit_code = 2


class RunDirError(FtctlError):
    """The output directory would be overwritten, or a run/checkpoint directory is incomplete."""

    exit_code = 2


class NonFiniteError(FtctlError):
    """A NaN/Inf loss, gradient or weight; training stopped with the last good checkpoint kept."""

    exit_code = 3


class Preempted(FtctlError):
    """SIGTERM/SIGINT arrived; a resumable checkpoint was saved at a step boundary (EX_TEMPFAIL)."""

    exit_code = 75
