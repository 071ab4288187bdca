"""The user-error types: a mistake the user can fix (config, data, checkpoint, eval set).

The command-line tools turn exactly these, and a full disk (``user_message``), into one ``error:``
line and exit code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno


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


def user_message(err: BaseException) -> str | None:
    """The one-line message for an exception the user can fix (a user error, a full disk or quota);
    None for a bug, which keeps its traceback."""
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        where = err.filename or "the output directory"
        return f"{err.strerror} while writing {where}: free space there or choose another output_dir"
    return None
