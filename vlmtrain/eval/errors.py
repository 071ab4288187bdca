"""The error raised for evaluation data that is missing or malformed."""


class EvalDataError(ValueError):
    """An evaluation set is missing or malformed; the message names the path/key and the fix."""
