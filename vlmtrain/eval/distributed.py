"""Evaluation under torch.distributed: every rank embeds its share, everyone gets the whole result.

Without an initialized process group these helpers are the identity (one rank holds all).
Results travel as pickled objects (``all_gather_object``): eval results are small next to
training traffic, and variable-length captions and keys ride along without padding logic.
"""
from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import TypeVar


from vlmtrain.distributed.collectives import all_gather_objects, rank_and_size

Result = TypeVar("Result")


def contiguous_share(count: int) -> slice:
    """This rank's contiguous slice of ``count`` items; slices of all ranks tile ``range(count)``."""
    rank, world = rank_and_size()
    return slice(count * rank // world, count * (rank + 1) // world)


def _portable(error: BaseException) -> BaseException:
    """The error itself if it survives pickling, else a RuntimeError carrying its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # any pickling failure: keep the message, drop the type
        return RuntimeError(f"{type(error).__name__}: {error}")


def gather_or_raise(compute: Callable[[], Result]) -> list[Result]:
    """Run ``compute`` on every rank and gather the results; if a rank failed, every rank raises.

    A rank that raised on its own (say, a malformed sample in its share) would leave the
    others waiting in the next collective forever. Here a failed rank raises its own error
    and the others raise the error of the first rank that failed.
    """
    _, world = rank_and_size()
    if world == 1:
        return [compute()]
    try:
        outcome = (compute(), None)
    except Exception as error:  # noqa: BLE001 - re-raised below, on every rank
        local_error = error
        outcome = (None, _portable(error))
    else:
        local_error = None
    gathered = all_gather_objects(outcome)
    for _, error in gathered:
        if error is not None:
            if local_error is not None:
                raise local_error
            raise error
    return [result for result, _ in gathered]
