"""The model forward of the embed step: one job's samples through a CLIP model, its files written.

Plain functions, no Ray (``workers`` runs them on the executor's model workers). ``clip_score`` is
the cosine of the float32 features, before the float16 cast; the index file is written last and
atomically, so a job whose index exists is complete.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from data_pipeline.embed.jobs import EmbedError, EmbedJob, Sample, job_outputs, read_job
from vlmtrain import atomic


def decode_rgb(sample: Sample, source: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(sample.image)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise EmbedError(f"{source}: sample {sample.uid!r}: undecodable image ({err})") from None


def embed_batch(model, pixels, tokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, text) L2-normalised float32 features and their row-wise cosine."""
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        image = F.normalize(model.encode_image(pixels).float(), dim=-1)
        text = F.normalize(model.encode_text(tokens).float(), dim=-1)
    return image.numpy(), text.numpy(), (image * text).sum(-1).numpy()


def embed_images(model, pixels) -> np.ndarray:
    """L2-normalised float32 image features (images-only jobs)."""
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        return F.normalize(model.encode_image(pixels).float(), dim=-1).numpy()


def embed_job(job: EmbedJob, loaded, out_dir: Path, batch_size: int) -> dict:
    """Embed every sample of one job with ``loaded`` (an ``EvalModel``); write its outputs."""
    import torch

    samples = list(read_job(job))
    images, texts, scores = [], [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        pixels = torch.stack([loaded.transform(decode_rgb(s, _where(job, s))) for s in chunk])
        if job.images_only:
            images.append(embed_images(loaded.model, pixels))
            continue
        tokens = loaded.tokenizer([s.caption for s in chunk])
        image, text, score = embed_batch(loaded.model, pixels, tokens)
        images.append(image)
        texts.append(text)
        scores.append(score)
    outputs = job_outputs(out_dir, job)
    dim = images[0].shape[1] if images else 0
    _save_npy(outputs["image"], np.concatenate(images) if images else np.zeros((0, dim)))
    columns = {"uid": [s.uid for s in samples], "key": [s.key for s in samples],
               "row": np.arange(len(samples), dtype=np.int64)}
    if not job.images_only:
        _save_npy(outputs["text"], np.concatenate(texts) if texts else np.zeros((0, dim)))
        columns["clip_score"] = np.concatenate(scores).astype(np.float32) if scores else np.zeros(0, np.float32)
    index = pd.DataFrame(columns)
    with atomic.replacing(outputs["index"]) as tmp:  # written last: it marks the job finished
        pq.write_table(pa.Table.from_pandas(index, preserve_index=False), tmp)
    return {"job": job.name, "rows": len(samples)}


def _where(job: EmbedJob, sample: Sample) -> str:
    """The file to name in a message: the job's shard or part, or the image file itself."""
    if job.path.endswith((".tar", ".parquet")):
        return job.path
    return str(Path(job.path) / sample.uid)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic.replacing(path) as tmp, open(tmp, "wb") as handle:  # np.save(path) would append .npy
        np.save(handle, array.astype(np.float16))
