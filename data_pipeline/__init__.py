"""Curation side of vlmtrain: raw image-text pairs → accountable, deduplicated webdataset shards."""
