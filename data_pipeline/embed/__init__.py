"""The embed step: CLIP image and text embeddings of the candidate rows and of the stages' reference
folders, one job per file:

  jobs     an ``EmbedJob`` (a shard, rows of a scored part, image files of a folder) and reading its samples
  forward  a job's samples through the model; its embedding files written
  workers  the worker loop: jobs over the executor's long-lived model workers, resumable (``embed_pool``)
  store    the embedding sets a run stores, read back for the embedding stages
  plan     which sets a curation run needs, and embedding them on the run's executor
"""
