"""The user-error types: a mistake the user can fix (config, data, checkpoint, eval set).

The command-line tools turn exactly these into one ``error:`` line and exit code 2; anything else
is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(ValueError):
    """A problem with what the user gave us; the message names the key or path and the fix."""


class ConfigError(UserError):
    """A configuration mistake; the message names the offending dotted key."""


class DataError(UserError):
    """A problem with the training data (missing path, no shards, too few shards)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, unreadable or unusable here; the message names the path."""


class EvalDataError(UserError):
    """An evaluation set is missing or malformed; the message names the path/key and the fix."""
