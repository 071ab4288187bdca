"""Real DeepSpeed checkpoints (ZeRO 0-3; one gloo rank) load for evaluation with the weights
the engine held when it saved them."""
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from vlmtrain.configlib import to_dict
from vlmtrain.distributed.env import free_port
from vlmtrain.eval.checkpoints import load_eval_model

from tests.helpers import TINY_CLIP as TINY

pytestmark = pytest.mark.e2e
STAGES = (0, 1, 2, 3)


def save_checkpoints(rank: int, port: int, out_dir: str) -> None:
    """One engine per ZeRO stage takes an optimizer step and saves RUN_s/checkpoints/step_0000001."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      DS_ACCELERATOR="cpu")
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from tests.helpers import build_clip as build_model

    deepspeed.init_distributed(dist_backend="gloo")
    for stage in STAGES:
        run = f"{out_dir}/run_zero{stage}"
        os.makedirs(run)
        with open(f"{run}/config.json", "w") as handle:
            json.dump({"model": to_dict(TINY)}, handle)
        torch.manual_seed(stage)
        model = build_model(TINY)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
            "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
        out = engine(torch.rand(2, 3, 32, 32), torch.randint(0, 100, (2, 16)))
        engine.backward(out["image_features"].sum() + out["text_features"].sum())
        engine.step()
        engine.save_checkpoint(f"{run}/checkpoints", tag="step_0000001")
        weights = {name: safe_get_full_fp32_param(p) if stage == 3 else p.detach().float().clone()
                   for name, p in engine.module.named_parameters()}
        torch.save(weights, f"{run}/expected.pt")


def test_every_zero_stage_checkpoint_loads_the_trained_weights(tmp_path):
    mp.spawn(save_checkpoints, args=(free_port(), str(tmp_path)), nprocs=1, join=True)

    for stage in STAGES:
        run = tmp_path / f"run_zero{stage}"
        expected = torch.load(run / "expected.pt", weights_only=True)
        loaded = load_eval_model(run)  # no export: the newest DeepSpeed checkpoint, via 'latest'
        state = loaded.model.state_dict()
        assert loaded.source == "deepspeed", stage
        assert set(expected) <= set(state), stage
        for name, tensor in expected.items():
            torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=f"zero {stage}: {name}")
        again = load_eval_model(run / "checkpoints" / "step_0000001")  # a tag directory works too
        torch.testing.assert_close(again.model.state_dict(), state, rtol=0, atol=0)
