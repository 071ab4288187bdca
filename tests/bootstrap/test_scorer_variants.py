"""Cheaper scorers (``embed.precision``, ``embed.sparsify``) through the real embed path (``embed_pool``):
the default stays exact, each variant runs and agrees with the exact scorer, bad values are named."""
from __future__ import annotations

import io
import json
import random

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from webdataset import TarWriter

from data_pipeline.config import EmbedConfig, ModelSpec, SparsifyConfig, load_bootstrap_config, load_curate_config
from data_pipeline.embed.jobs import EmbedError, read_shard
from data_pipeline.embed.workers import MODEL_FILE, embed_pool
from tests.helpers import build_clip, clip_config
from vlmtrain.checkpoint import write_export
from vlmtrain.errors import ConfigError
from vlmtrain.eval.checkpoints import load_eval_model
from vlmtrain.models.clip.openclip import write_openclip_dir

# Four vision blocks, so three of them can sparsify; 16 patches per image.
CFG = clip_config(embed_dim=32, vision={"width": 32, "layers": 4}, text={"context_length": 16, "width": 32})
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "circle")


def quiet(**keys) -> EmbedConfig:
    return EmbedConfig(progress=False, batch_size=16, **keys)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    """A random CLIP as an export, and a shard of 64 coloured shapes with captions (some mismatched)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("scorer")
    model = build_clip(CFG).eval()
    write_export(model.state_dict(), CFG, root / "final", {})
    rng = random.Random(0)
    shard = root / "pool-000.tar"
    with TarWriter(str(shard)) as tar:
        for i in range(64):
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            image = Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in range(3)))
            box = [rng.randrange(4, 12), rng.randrange(4, 12), rng.randrange(20, 28), rng.randrange(20, 28)]
            (ImageDraw.Draw(image).rectangle if shape == "square" else ImageDraw.Draw(image).ellipse)(
                box, fill=COLOURS[colour])
            png = io.BytesIO()
            image.save(png, format="PNG")
            caption = f"a {colour} {shape}" if i % 4 else f"{rng.choice(['some', 'no'])} text {i}"
            tar.write({"__key__": f"{i:04d}", "png": png.getvalue(), "txt": caption.encode()})
    return root / "final", root / "open_clip", model, str(shard)


def spearman(a, b) -> float:
    return float(pd.Series(a).corr(pd.Series(b), method="spearman"))


def test_default_scorer_gives_exactly_the_scores_of_a_bare_fp32_forward_and_keeps_the_old_stamp(scorer, tmp_path):
    export, _, _, shard = scorer
    spec = ModelSpec(checkpoint=str(export))
    index = embed_pool([shard], tmp_path, spec, quiet(), use_ray=False)
    loaded = load_eval_model(export)
    samples = list(read_shard(shard))
    with torch.inference_mode():  # the embed step before scorer variants existed, batch for batch
        expected = []
        for start in range(0, len(samples), 16):
            chunk = samples[start:start + 16]
            pixels = torch.stack([loaded.transform(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in chunk])
            image = F.normalize(loaded.model.encode_image(pixels).float(), dim=-1)
            text = F.normalize(loaded.model.encode_text(loaded.tokenizer([s.caption for s in chunk])).float(), dim=-1)
            expected.append((image * text).sum(-1).numpy())
    np.testing.assert_array_equal(index["clip_score"].to_numpy(), np.concatenate(expected).astype(np.float32))
    # embeddings a run made before the variants existed are stamped with the model only: still reused
    assert json.loads((tmp_path / MODEL_FILE).read_text()) == spec.describe()


def test_each_variant_runs_through_the_embed_step_and_agrees_with_the_exact_scorer(scorer, tmp_path):
    export, _, _, shard = scorer
    spec = ModelSpec(checkpoint=str(export))
    exact = embed_pool([shard], tmp_path / "exact", spec, quiet(), use_ray=False)["clip_score"]
    assert exact.std() > 0.05  # a spread of scores to rank
    sparse = SparsifyConfig(depths=[1, 2, 3], keep=0.7)
    variants = {"bf16": (quiet(precision="bf16"), 0.99), "int8": (quiet(precision="int8"), 0.99),
                "sparse": (quiet(sparsify=sparse), 0.9), "int8+sparse": (quiet(precision="int8", sparsify=sparse), 0.9)}
    for name, (cfg, bound) in variants.items():  # in this process: the class Ray's actors run (test_embed.py)
        scores = embed_pool([shard], tmp_path / name, spec, cfg, use_ray=False)["clip_score"]
        rho = spearman(scores, exact)
        assert bound < rho < 1.0 - 1e-9, (name, rho)  # close to the exact scorer, yet not it
        assert json.loads((tmp_path / name / MODEL_FILE).read_text()) == {**spec.describe(), **cfg.variant()}
    messages = []  # another variant into the same folder: embedded again, never reused
    embed_pool([shard], tmp_path / "exact", spec, quiet(precision="int8"), use_ray=False, log=messages.append)
    assert "embeddings of another model found; starting over" in messages[0]


@pytest.mark.parametrize("override, key", [
    ("embedding.embed.precision=fp16", "'embedding.embed.precision': got 'fp16', allowed values: fp32, bf16, int8"),
    ("embedding.embed.sparsify.keep=0", "'embedding.embed.sparsify.keep': got 0.0, must be >= 0.01"),
    ("embedding.embed.sparsify.keep=1.5", "'embedding.embed.sparsify.keep': got 1.5, must be <= 1.0"),
    ("embedding.embed.sparsify.depths=[1,1]", "'embedding.embed.sparsify.depths': got [1, 1], must be distinct"),
    ("embedding.embed.sparsify.depths=[-1]", "'embedding.embed.sparsify.depths': got [-1], must be distinct"),
    ("embedding.embed.sparsify.depths=two", "'embedding.embed.sparsify.depths' must be a list"),
    ("embedding.embed.sparsify.ratio=0.5", "unknown config key 'embedding.embed.sparsify.ratio'"),
])
def test_bad_scorer_options_name_their_key(override, key, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_curate_config(None, ["sources=[{path: x}]", f"output_dir={tmp_path}", override])
    assert key in str(err.value)


def test_bootstrap_checks_its_scorer_options_too(tmp_path):
    with pytest.raises(ConfigError, match=r"'embed.sparsify.depths': got \[2, 2\]"):
        load_bootstrap_config(None, ["pool=p", f"output_dir={tmp_path}", "embed.sparsify.depths=[2,2]"])


def test_variants_the_model_cannot_run_fail_with_the_key(scorer, tmp_path):
    export, folder, model, shard = scorer
    deep = quiet(sparsify=SparsifyConfig(depths=[1, 4]))
    with pytest.raises(EmbedError, match=r"embed.sparsify.depths=\[1, 4\] does not fit .*outside the tower's 4 blocks"):
        embed_pool([shard], tmp_path / "a", ModelSpec(checkpoint=str(export)), deep, use_ray=False)
    open_clip_dir = write_openclip_dir(model.state_dict(), CFG, folder)
    with pytest.raises(EmbedError, match="embed.sparsify needs a vlm-train CLIP model"):
        embed_pool([shard], tmp_path / "b", ModelSpec(open_clip_model=f"local-dir:{open_clip_dir}"),
                   quiet(sparsify=SparsifyConfig(depths=[1])), use_ray=False)
