"""Curation stages: plain functions over a pandas batch that ADD columns (scores, flags, a reason).

No stage drops a row; ``data_pipeline.select`` alone decides what is kept.
"""
