"""Helpers shared by the tests: model configs and models the tests build themselves."""
from __future__ import annotations

from vlmtrain.models.registry import get_spec

CLIP_SPEC = get_spec("clip")


def clip_config(preset: str = "tiny", **model_keys):
    """A resolved CLIP model config: the preset with ``model_keys`` laid over it (sections merge)."""
    return CLIP_SPEC.resolve({"preset": preset, **model_keys})


def build_clip(cfg):
    return CLIP_SPEC.build(cfg)


# A CLIP small enough for quick CPU tests of curation and evaluation.
TINY_CLIP = clip_config(embed_dim=32, vision={"width": 32}, text={"context_length": 16, "width": 32})


def loader_inputs(image_size: int = 16, context_length: int = 8) -> tuple:
    """The image transform and tokenizer a CLIP of this size trains with (what the loader is given)."""
    cfg = clip_config(vision={"image_size": image_size}, text={"context_length": context_length})
    return CLIP_SPEC.image_transform(cfg, True), CLIP_SPEC.tokenizer(cfg)


def measure_memory(out_dir, overrides: list[str], nproc: int = 2) -> list[dict]:
    """Per-rank bytes by component of a real DeepSpeed run (``tools/measure_memory.py`` on gloo)."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO, cli_env
    from vlmtrain.distributed.env import free_port

    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(REPO / "tools/measure_memory.py"),
               "--config", str(REPO / "configs/train/demo.yaml"), "--out", str(out_dir), *overrides]
    result = subprocess.run(command, cwd=REPO, env={**cli_env(), "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(nproc)]
