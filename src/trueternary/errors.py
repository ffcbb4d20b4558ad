"""Every error a user of ``trueternary`` is shown, defined once; ``trueternary`` reports each in one line.

    UsageError              a bad flag value or combination                                      exit code 2
    DataError               bad, missing or empty training data                                  exit code 2
    CheckpointError         a checkpoint that is missing, corrupt, truncated, foreign or newer   exit code 2
    WriteError              a file of a run that could not be written                            exit code 2
    TrainingError           training cannot go on (it diverged)                                  exit code 1
    NonFiniteGradientError  ``FlipOptimizer.step`` saw NaN/inf gradients (``train`` reports it as a TrainingError,
                            ``bench`` as a diverged config)

``cli.main`` catches :data:`USAGE_ERRORS` (exit code 2) and :class:`TrainingError` (exit code 1). This module
imports nothing from the package, so every module can raise them. The modules that used to define them
(``cli``, ``data``, ``checkpoint``, ``train``, ``optim``) still export them under their old names.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A bad flag value or combination: reported in one line, exit code 2."""


class DataError(ValueError):
    """Bad, missing or empty training data (reported to the user in one line)."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, truncated, foreign or from a newer format (one line)."""


class WriteError(ValueError):
    """A file of a run could not be written (disk full, read-only file system, no permission): one line
    naming the path, exit code 2. ``reason``: the operating system's words for it."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class ExportError(ValueError):
    """An export that cannot be done as asked (one line; exit code 2 on the command line)."""


class TrainingError(RuntimeError):
    """Training cannot go on (diverged); reported in one line, exit code 1."""


class NonFiniteGradientError(FloatingPointError):
    """Raised by ``FlipOptimizer.step`` when a backward pass produced NaN or inf weight gradients."""


# What the user can fix (a flag, the data, a checkpoint, a file system): one line, exit code 2.
USAGE_ERRORS: tuple[type[Exception], ...] = (UsageError, DataError, CheckpointError, WriteError, ExportError)
