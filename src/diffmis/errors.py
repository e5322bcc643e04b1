"""Exception types. Each message names the file, key or tensor it concerns."""

from __future__ import annotations

__all__ = ["DiffmisError", "ConfigError", "DataError", "CheckpointError", "InputError"]


class DiffmisError(Exception):
    """Base class of errors the CLI reports as a clean message (exit code 2)."""


class ConfigError(DiffmisError, ValueError):
    """A configuration problem; the message names the key (dotted path) and the file when known."""


class DataError(DiffmisError):
    """A dataset problem found at load or check time (missing/corrupt file, size or label mismatch)."""


class CheckpointError(DiffmisError):
    """A checkpoint that does not fit the model it is loaded into, or a run folder that is incomplete."""


class InputError(DiffmisError):
    """An input given on the command line or to the API cannot be used (missing file, wrong channels)."""
