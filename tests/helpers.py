"""Shared test helpers: hostile inputs and small real runs the safety tests build on."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tests.conftest import REPO
from vlmtrain.config import ModelConfig, TextConfig, VisionConfig, to_dict

TINY = ModelConfig(name="tiny", embed_dim=32, vision=VisionConfig(image_size=32, patch_size=8, width=32, heads=2),
                   text=TextConfig(context_length=16, width=32, heads=2))


class _CreatesFile:
    """Unpickling this runs a shell command: what a hostile checkpoint file could carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def write_hostile_run(run: Path, marker: Path) -> Path:
    """A vlm-train run directory whose ZeRO-0 checkpoint holds real weights plus a pickle that creates
    ``marker`` when unpickled fully: loading it the trusting way would work, and run the command."""
    from vlmtrain.models.registry import build_model

    tag_dir = run / "checkpoints" / "step_0000001"
    tag_dir.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": to_dict(TINY)}))
    (run / "checkpoints" / "latest").write_text(tag_dir.name)
    torch.save({"module": build_model(TINY).state_dict(), "client_state": _CreatesFile(marker)},
               tag_dir / "mp_rank_00_model_states.pt")
    return run


def curate_config_args(sources: str, out: Path, *extra: str) -> list[str]:
    """``vlm-curate run`` arguments: the demo config over ``sources`` (a YAML list) into ``out``, quiet."""
    return [str(REPO / "configs" / "curate" / "demo.yaml"), f"output_dir={out}", f"sources={sources}",
            "progress=false", *extra]


def webdataset_source(path: Path) -> str:
    return f"[{{format: webdataset, path: '{path}'}}]"


def copy_shards(corpus_train: Path, into: Path, count: int = 2) -> Path:
    """The first ``count`` generated shards, copied: a pool the test may change."""
    into.mkdir(parents=True)
    for shard in sorted(corpus_train.glob("*.tar"))[:count]:
        (into / shard.name).write_bytes(shard.read_bytes())
    return into


def rewrite_captions_in_place(shard: Path, change) -> None:
    """Rewrite ``shard`` in place with every caption passed through ``change`` (which must keep its length),
    so the file keeps its name and size and only its content differs."""
    import io
    import tarfile

    members = []
    with tarfile.open(shard) as tar:
        for info in tar:
            data = tar.extractfile(info).read()
            if info.name.endswith(".txt"):
                data = change(data.decode()).encode()
            members.append((info, data))
    size = shard.stat().st_size
    with open(shard, "r+b") as handle, tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert shard.stat().st_size == size, "the rewrite must keep the shard's size"
