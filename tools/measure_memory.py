"""Measure what one rank of a real DeepSpeed run holds, by component, to check ``vlm-train plan``.

Run it like a training run (one process per rank, under torchrun)::

    python -m torch.distributed.run --nproc_per_node 2 tools/measure_memory.py \\
        --config configs/train/demo.yaml --out /tmp/mem zero_stage=3 data.batch_size=16

It builds the run as ``vlm-train`` does (same config, model, optimizer and DeepSpeed config) and
trains two steps on synthetic batches of the configured micro-batch (memory does not depend on the
pixels). Each rank writes ``OUT/rank<R>.json`` with bytes by component:

* ``activations``: the bytes autograd saves for backward during the forward and the loss of step 2
  (``torch.autograd.graph.saved_tensors_hooks``), each storage counted once, parameters excluded.
* ``parameters``, ``gradients``, ``optimizer``, ``buffers``: every tensor alive in the process
  (found through the garbage collector, each storage counted once) where gradient memory peaks in
  the backward of step 2: at ZeRO 0 when DeepSpeed's flat copy of the gradients exists, at ZeRO 1-2
  just before its reduction bucket is released (probes around those methods, which still run),
  and after the backward; the larger snapshot is kept. Storages are attributed by who holds them:
  the model's parameters (ZeRO-3 partitions and persistent parameters included); the torch
  optimizer's state (AdamW m, v) and its parameters where they are not the model's; ``.grad`` of
  either is ``gradients``; everything else is ``buffers`` (DeepSpeed's flat gradient partitions and
  buckets, its ZeRO-3 fp32 master partitions, the batch). So ``gradients + optimizer + buffers``
  is the figure to compare with a plan's gradients, optimizer state and buffers, not each alone.

Under pipeline parallelism (``parallel.pp`` > 1) the rank builds its stage as the engine does
(``vlmtrain.distributed.pipeline.split``) and trains two ``engine.train_batch`` steps of
``optim.grad_accum_steps`` micro-batches through DeepSpeed's 1F1B schedule. In step 2:

* ``activations``: the largest total, over the schedule, of the bytes autograd saved in the forward
  passes (the loss included, on the last stage) of the micro-batches in flight on this stage: a
  micro-batch's count from its forward pass to the end of its backward pass.
* the other components: snapshots (as above) before each backward pass, just before and after the
  gradient reduction and before the optimizer step, the largest kept. The other stages' weights,
  which every rank builds and DeepSpeed keeps referenced in host memory, are left out.
* ``stage``: the rank's pipeline stage.

On a GPU, ``peak_allocated`` adds ``torch.cuda.max_memory_allocated`` for reference.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist


def storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    return tensor.device.type, tensor.untyped_storage().data_ptr()


def storage_of(tensor: torch.Tensor) -> tuple[tuple[str, int], int]:
    """A storage's key and bytes; a wrapper subclass without storage (a functional collective's
    result) is keyed by its identity and counts its own elements."""
    try:
        return storage_key(tensor), tensor.untyped_storage().nbytes()
    except RuntimeError:
        return ("object", id(tensor)), tensor.numel() * tensor.element_size()


class StorageLedger:
    """Storages by key, each counted once, with the first component that claimed it."""

    def __init__(self) -> None:
        self.owner: dict[tuple[str, int], str] = {}
        self.nbytes: dict[tuple[str, int], int] = {}

    def claim(self, tensor: object, component: str) -> None:
        if not isinstance(tensor, torch.Tensor):
            return
        key, nbytes = storage_of(tensor)
        if nbytes and key not in self.owner:
            self.owner[key] = component
            self.nbytes[key] = nbytes

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key, component in self.owner.items():
            out[component] = out.get(component, 0) + self.nbytes[key]
        return out


def live_tensors() -> list[torch.Tensor]:
    tensors = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
                tensors.append(obj)
        except ReferenceError:  # a weak proxy whose target is gone
            continue
    return tensors


def snapshot(module: torch.nn.Module, optimizer: torch.optim.Optimizer,
             saved: set[tuple[str, int]], elsewhere: tuple[torch.Tensor, ...] = ()) -> dict[str, int]:
    """Bytes of every live tensor storage, attributed to a component (see the module docstring);
    ``saved``: storages already counted as activations; ``elsewhere``: tensors that are not this
    rank's (another pipeline stage's weights, kept in host memory), left out."""
    ledger = StorageLedger()
    for tensor in elsewhere:
        ledger.claim(tensor, "elsewhere")
    for param in module.parameters():
        ledger.claim(param.data, "parameters")
        ledger.claim(getattr(param, "ds_tensor", None), "parameters")
    for group in optimizer.param_groups:
        for param in group["params"]:
            ledger.claim(param.data, "optimizer")  # a master copy unless the model's own storage
    for state in optimizer.state.values():
        for value in state.values():
            ledger.claim(value, "optimizer")
    for param in list(module.parameters()) + [p for g in optimizer.param_groups for p in g["params"]]:
        ledger.claim(param.grad, "gradients")
    tensors = live_tensors()
    for tensor in tensors:
        if storage_of(tensor)[0] in saved:
            ledger.claim(tensor, "activations")
    for tensor in tensors:
        ledger.claim(tensor, "buffers")

    return ledger.totals()


class SavedBytes:
    """Bytes autograd saves for backward, each storage once, leaving out parameters."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.seen: dict[tuple[str, int], int] = {}
        self.keep: list[torch.Tensor] = []  # holds storages so a freed address is not reused meanwhile

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key, nbytes = storage_of(tensor)
        # Looked up each time: ZeRO-3 gathers each parameter into a fresh storage for its forward.
        params = {storage_key(p) for p in self.module.parameters() if p.untyped_storage().nbytes()}
        if key not in params and key not in self.seen:
            self.seen[key] = nbytes
            self.keep.append(tensor)
        # Detached: a saved output returned as itself would hold its own grad_fn, whose saved
        # variable holds it again: a reference cycle that outlives the backward until gc runs.
        return tensor.detach()

    @property
    def total(self) -> int:
        return sum(self.seen.values())


@contextmanager
def probe(owner: object, method: str, before: bool, take: Callable[[], None]):
    """Take a snapshot just before or just after ``owner.method`` runs (the method still runs)."""
    original = getattr(owner, method)

    def probed(*args, **kwargs):
        if before:
            take()
        out = original(*args, **kwargs)
        if not before:
            take()
        return out

    setattr(owner, method, probed)
    try:
        yield
    finally:
        setattr(owner, method, original)


class InFlightSaved:
    """Bytes autograd saves for backward in a pipeline stage's forward passes, by micro-batch buffer:
    a buffer's are live from its forward to the end of its backward; ``peak`` is the largest live
    total. Parameters are left out, each storage is counted once per micro-batch."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.live: dict[int, SavedBytes] = {}
        self.peak = 0

    def storages(self) -> set[tuple[str, int]]:
        return {key for saved in self.live.values() for key in saved.seen}

    def forward(self, run: Callable[[], None], buffer_id: int) -> None:
        saved = self.live[buffer_id] = SavedBytes(self.module)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            run()
        self.peak = max(self.peak, sum(s.total for s in self.live.values()))

    def backward_done(self, buffer_id: int) -> None:
        done = self.live.pop(buffer_id, None)
        if done is not None:  # the autograd graph may keep the hook (and so this record) alive
            done.keep.clear()


def measure_pipeline(cfg, engine, inputs: dict[str, torch.Tensor],
                     elsewhere: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """Two ``train_batch`` steps of ``grad_accum_steps`` micro-batches through DeepSpeed's 1F1B
    schedule; in step 2, the stage's in-flight saved activations (:class:`InFlightSaved`) and
    snapshots before each backward pass, around the gradient reduction and before the optimizer step."""
    from deepspeed.runtime.pipe import schedule

    from vlmtrain.distributed.pipeline import NO_LABELS

    def batches():
        return iter([((inputs["images"], inputs["tokens"]), NO_LABELS)] * cfg.optim.grad_accum_steps)

    engine.train_batch(batches())  # step 1 creates the optimizer state
    torch_optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    saved = InFlightSaved(engine.module)
    snapshots: list[dict[str, int]] = []

    def take() -> None:
        snapshots.append(snapshot(engine.module, torch_optimizer, saved.storages(), elsewhere))

    original = type(engine)._INSTRUCTION_MAP

    def forward(self, buffer_id):
        saved.forward(lambda: original[schedule.ForwardPass](self, buffer_id), buffer_id)

    def backward(self, buffer_id):
        take()
        original[schedule.BackwardPass](self, buffer_id)
        saved.backward_done(buffer_id)

    def reduce(self):
        take()
        original[schedule.ReduceGrads](self)
        take()

    def step(self, *args, **kwargs):
        take()
        original[schedule.OptimizerStep](self, *args, **kwargs)

    engine._INSTRUCTION_MAP = {**original, schedule.ForwardPass: forward, schedule.BackwardPass: backward,
                               schedule.ReduceGrads: reduce, schedule.OptimizerStep: step}
    engine.train_batch(batches())
    del engine._INSTRUCTION_MAP
    held = max(snapshots, key=lambda s: sum(v for k, v in s.items() if k not in ("activations", "elsewhere")))
    return {"activations": saved.peak, "stage": engine.stage_id,
            **{k: held.get(k, 0) for k in ("parameters", "gradients", "optimizer", "buffers")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from vlmtrain.cli import configure_runtime

    configure_runtime()
    import deepspeed

    from vlmtrain.config import load_train_config
    from vlmtrain.distributed.deepspeed_config import build_deepspeed_config
    from vlmtrain.distributed.parallel_dims import build_process_groups
    from vlmtrain.models.registry import spec_of
    from vlmtrain.optim import build_optimizer, build_scheduler

    cfg = load_train_config(args.config, args.overrides)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    dims = cfg.parallel_dims(dist.get_world_size())
    groups = build_process_groups(dims, rank)
    spec = spec_of(cfg.model)
    torch.manual_seed(cfg.seed)
    model = spec.build(cfg.model)
    loss_fn = spec.build_loss(cfg.model, groups.dp)
    elsewhere: tuple[torch.Tensor, ...] = ()
    if dims.pp > 1:  # this rank's stage, as the engine builds it
        from vlmtrain.distributed import pipeline

        whole = tuple(model.state_dict(keep_vars=True).values())
        model = pipeline.split(spec, model, loss_fn, dims)
        mine = {id(t) for t in model.state_dict(keep_vars=True).values()}
        elsewhere = tuple(t for t in whole if id(t) not in mine)
    optimizer = build_optimizer(model, cfg.optim, spec.no_weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=build_scheduler(optimizer, cfg.optim, cfg.steps),
                                           config=build_deepspeed_config(cfg, dims, spec.tp_plan, model))
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    with torch.device(engine.device):
        # Random images and token ids; other integer or bool inputs (a family's masks and patch indices)
        # as the family's example gives them: random values would not be valid indices.
        inputs = {k: (v.normal_().to(dtype) if v.is_floating_point() else v.random_(0, 1000) if k == "tokens" else v)
                  for k, v in spec.example_inputs(cfg.model, cfg.data.batch_size).items()}
    if dims.pp > 1:
        result = {"rank": rank, "layout": {"zero": cfg.zero_stage, "dp": dims.dp, "tp": dims.tp, "pp": dims.pp},
                  **measure_pipeline(cfg, engine, inputs, elsewhere)}
        write_result(result, Path(args.out), rank)
        return
    torch_optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch one

    engine.backward(loss_fn(engine(**inputs))["loss"])  # step 1 creates the optimizer state
    engine.step()

    snapshots: list[dict[str, int]] = []
    saved = SavedBytes(engine.module)

    def take() -> None:
        snapshots.append(snapshot(engine.module, torch_optimizer, set(saved.seen)))

    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        loss = loss_fn(engine(**inputs))["loss"]
    # Where gradient memory peaks inside the backward: ZeRO 0 when its flat copy of the gradients
    # exists (before the all-reduce), ZeRO 1-2 just before the reduction bucket is released.
    # ZeRO 3 keeps its bucket for the whole run.
    peaks = {0: (engine, "flatten", False), 1: (engine.optimizer, "_release_ipg_buffers", True),
             2: (engine.optimizer, "_release_ipg_buffers", True)}
    with probe(*peaks[cfg.zero_stage], take) if cfg.zero_stage in peaks else nullcontext():
        engine.backward(loss)
    take()
    engine.step()
    held = max(snapshots, key=lambda s: sum(s.values()))
    result = {"rank": rank, "layout": {"zero": cfg.zero_stage, "dp": dims.dp, "tp": dims.tp, "pp": dims.pp},
              "activations": saved.total, **{k: held.get(k, 0) for k in
                                             ("parameters", "gradients", "optimizer", "buffers")}}
    write_result(result, Path(args.out), rank)


def write_result(result: dict, out: Path, rank: int) -> None:
    if torch.cuda.is_available():
        result["peak_allocated"] = torch.cuda.max_memory_allocated()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
