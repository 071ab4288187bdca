"""Curation stages, one module each with its config dataclass and its function (the registry,
``data_pipeline.registry``, lists them in order). A row stage adds columns (scores, flags, a reason)
to a pandas batch; a global stage returns a verdict over all candidates (``data_pipeline.candidates``).

No stage drops a row; the selection alone decides what is kept.
"""
