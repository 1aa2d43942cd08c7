"""Exception types. The CLI turns each into one line on stderr and a non-zero exit."""

from __future__ import annotations


def first_line(exc: BaseException, width: int = 200) -> str:
    """The first line of a library's error message, for a one-line report (its type if empty)."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:width]


class LfpassError(Exception):
    """A problem the user can act on; the message says what and where."""


class ConfigError(LfpassError):
    """A bad option, pipeline key or value."""


class TraceError(LfpassError):
    """A model could not be turned into a graph."""


class PlanError(LfpassError):
    """A plan does not fit the graph it is applied to, or cannot be read."""


class InputError(LfpassError):
    """A model file or factory that cannot be read."""


class OutputError(LfpassError):
    """An output that cannot be written."""


class ValidationFailed(LfpassError):
    """A rewritten model's outputs differ from the original's beyond the chosen tolerances.

    ``result`` carries what was measured (for a report), when there is one."""

    def __init__(self, message: str, result: object = None):
        super().__init__(message)
        self.result = result
