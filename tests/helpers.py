"""Helpers shared by the tests: model configs and models the tests build themselves, hostile inputs,
small real runs, and killing or reading vlm-train runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, cli_env, failure_text
from vlmtrain.configlib import to_dict
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


def png_bytes(seed: int, size: int = 20) -> bytes:
    """A random RGB image as PNG bytes (a shard sample's image)."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def measure_memory(out_dir, overrides: list[str], nproc: int = 2) -> list[dict]:
    """Per-rank bytes by component of a real DeepSpeed run (``tools/measure_memory.py`` on gloo)."""
    from vlmtrain.distributed.env import free_port

    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(REPO / "tools/measure_memory.py"),
               "--config", str(REPO / "configs/train/demo.yaml"), "--out", str(out_dir), *overrides]
    result = subprocess.run(command, cwd=REPO, env={**cli_env(), "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, failure_text(result)
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(nproc)]


class _CreatesFile:
    """Unpickling this runs a shell command: what a hostile checkpoint file could carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def write_hostile_run(run: Path, marker: Path) -> Path:
    """A vlm-train run directory whose ZeRO-0 checkpoint holds real weights plus a pickle that creates
    ``marker`` when unpickled fully: loading it the trusting way would work, and run the command."""
    tag_dir = run / "checkpoints" / "step_0000001"
    tag_dir.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": to_dict(TINY_CLIP)}))
    (run / "checkpoints" / "latest").write_text(tag_dir.name)
    torch.save({"module": build_clip(TINY_CLIP).state_dict(), "client_state": _CreatesFile(marker)},
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


# ---------------------------------------------------------------- vlm-train runs


def train_command(corpus: Path, out_dir: Path, ranks: int, *overrides: str,
                  config: str = "configs/train/demo.yaml") -> list[str]:
    return [str(Path(sys.executable).parent / "vlm-train"), "--config", config,
            "--nproc-per-node", str(ranks), f"data.train_shards={corpus / 'train'}", f"output_dir={out_dir}",
            "metrics.tensorboard=false", "progress=false", *overrides]


def train(corpus: Path, out_dir: Path, ranks: int, *overrides: str,
          config: str = "configs/train/demo.yaml") -> subprocess.CompletedProcess:
    """A run that must succeed; returns its completed process (stdout says what it resumed)."""
    from tests.conftest import run_tool

    result = run_tool(*train_command(corpus, out_dir, ranks, *overrides, config=config))
    assert result.returncode == 0, failure_text(result)
    return result


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a node failure or OOM kill would.

    (torchrun starts its workers in sessions of their own, so a process-group kill misses them.)"""
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    for process in processes:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=30)


def kill_while_writing(command: list[str], checkpoints: Path, tag: str, timeout: float = 600) -> bool:
    """Start the run; SIGKILL its whole process tree once `tag` is being written.

    Returns whether the kill landed while the checkpoint was still in the staging area."""
    process = subprocess.Popen(command, cwd=REPO, env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = checkpoints / ".staging" / tag
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if staging.is_dir() and any(staging.iterdir()):
                kill_tree(process.pid)
                return not (checkpoints / tag).exists()
            time.sleep(0.001)
        raise AssertionError(f"the run ended (code {process.returncode}) before writing {tag}")
    finally:
        if process.poll() is None:
            kill_tree(process.pid)


def kill_at_failpoint(command: list[str], failpoint: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``command`` with the fault-injection point ``failpoint`` armed (see vlmtrain/failpoints.py):
    rank 0 SIGKILLs itself there and the launcher takes the other ranks down, as on a node failure."""
    process = subprocess.Popen(command, cwd=REPO, env={**cli_env(), "VLMTRAIN_FAILPOINT": failpoint},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            kill_tree(process.pid)
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode != 0 and "Signal 9 (SIGKILL)" in stderr, \
        f"the run was not killed at {failpoint}: code {result.returncode}\n{failure_text(stderr)}"
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir)}


def keys_per_step(run_dir: Path, ranks=(0, 1)) -> dict[tuple[int, int], list[str]]:
    """The sample keys each rank trained on, by (rank, step); a step logged twice fails."""
    steps = {}
    for rank in ranks:
        for line in (run_dir / "sample_keys" / f"rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            assert (rank, record["step"]) not in steps, f"step {record['step']} logged twice"
            steps[rank, record["step"]] = record["keys"]
    return steps


def exported_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=0, msg=name)


def assert_weights_within_norm(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                               rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Each tensor (same full shape) equal to ``rtol`` of its norm, no element off by more than 10·atol: the
    bound for runs that sum in another order (tensor parallelism, ZeRO partitions; see test_tensor_parallel)."""
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].shape == expected[name].shape, name
        assert (actual[name] - expected[name]).norm() <= rtol * expected[name].norm() + atol, name
        torch.testing.assert_close(actual[name], expected[name], atol=10 * atol, rtol=rtol, msg=name)


def records_by_step(*run_dirs: Path) -> dict[int, dict]:
    """The metrics records of one run told by several directories in order (a run, then its resumed
    continuation), by step; a later directory's record of a step replaces an earlier one's."""
    return {record["step"]: record for run_dir in run_dirs for record in metrics(run_dir)}


def assert_same_steps(run: Path, reference: Path, keys: tuple[str, ...], steps: list[int],
                      rtol: float, atol: float) -> None:
    """``run`` logged ``steps`` and each of ``keys`` at each of them equal to ``reference``'s; the gradient
    norm (which sees a gradient scaled as a whole, as AdamW hardly does) to 10·rtol, where both report it."""
    actual, expected = records_by_step(run), records_by_step(reference)
    assert [step for step in actual if step in steps] == steps
    for key in keys:
        assert [actual[s][key] for s in steps] == pytest.approx([expected[s][key] for s in steps],
                                                                abs=atol, rel=rtol), key
    norms = [(actual[s]["grad_norm"], expected[s]["grad_norm"]) for s in steps
             if "grad_norm" in actual[s] and "grad_norm" in expected[s]]
    assert [a for a, _ in norms] == pytest.approx([e for _, e in norms], rel=10 * rtol)


# A masking family's layout tests (FLAVA, MaskVLM) share three launches; see test_flava.py.
PARITY_STEPS, RESUME_AT = 5, 2


def family_layout_runs(corpus: Path, tmp_path_factory, config: str, common: tuple[str, ...],
                       trained_steps: int) -> dict:
    """``dp2``: 2 ranks at ZeRO 0, ``PARITY_STEPS`` steps, checkpointed at ``RESUME_AT`` (the reference);
    ``dp2_tp2_zero3``: 4 ranks, dp=2 × tp=2 under ZeRO 3, the same steps; ``trained``: ``dp2`` resumed from
    its checkpoint in a new directory and trained on to ``trained_steps`` (``resume_log``: its stdout)."""
    dirs = {name: tmp_path_factory.mktemp(name) for name in ("dp2", "dp2_tp2_zero3", "trained")}
    train(corpus, dirs["dp2"], 2, *common, f"steps={PARITY_STEPS}", "zero_stage=0",
          f"checkpoint.every={RESUME_AT}", config=config)
    train(corpus, dirs["dp2_tp2_zero3"], 4, *common, f"steps={PARITY_STEPS}", "parallel.tp=2", "zero_stage=3",
          config=config)
    checkpoint = dirs["dp2"] / "checkpoints" / f"step_{RESUME_AT:07d}"
    dirs["resume_log"] = train(corpus, dirs["trained"], 2, *common, f"steps={trained_steps}", "zero_stage=0",
                               f"resume={checkpoint}", config=config).stdout
    return dirs


def assert_dp2_tp2_zero3_equals_dp2(runs: dict, terms: tuple[str, ...], global_batch: int,
                                    rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Every term at every step and the exported weights equal, with a loss that moved (so agreement means
    something) and the layout the summary reports."""
    run, reference = runs["dp2_tp2_zero3"], runs["dp2"]
    assert_same_steps(run, reference, ("loss", *terms), list(range(1, PARITY_STEPS + 1)), rtol=rtol, atol=atol)
    expected = losses(reference)
    assert max(expected.values()) - min(expected.values()) > 0.1, "the loss did not move"
    assert_weights_within_norm(exported_weights(run), exported_weights(reference), rtol=rtol, atol=atol)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["parallel"] == {"dp": 2, "tp": 2, "pp": 1} and summary["global_batch"] == global_batch


def assert_resume_continues_exactly(runs: dict, terms: tuple[str, ...]) -> None:
    """The resumed run starts after its checkpoint and replays the reference's later steps (masks, swaps, lr)."""
    assert f"at step {RESUME_AT}" in runs["resume_log"]
    assert min(records_by_step(runs["trained"])) == RESUME_AT + 1  # it logged from the step after
    assert_same_steps(runs["trained"], runs["dp2"], ("loss", *terms, "lr"),
                      list(range(RESUME_AT + 1, PARITY_STEPS + 1)), rtol=0, atol=1e-6)
