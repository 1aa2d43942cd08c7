"""The retraining package's own error type (a :class:`~lfpass.core.errors.LfpassError`, so the CLI
reports it in one line like any other)."""

from __future__ import annotations

from lfpass.core.errors import LfpassError


class TrainingError(LfpassError):
    """Retraining cannot go on: the loss became NaN/Inf, or a fusion broke the ties."""
