"""``vlm-train plan``: the per-rank memory of every layout of a run, before any GPU is asked for.

Two halves. :func:`census` builds the model on the meta device (no memory, no compute, any size)
and records what a layout splits: each parameter's elements, whether the family's tensor-parallel
plan splits it, and which of the family's pipeline layers holds it; and, from one forward plus the
loss on the meta device, the bytes autograd saves for backward, per transformer block, split or not
by tensor parallelism.
:func:`rank_memory` is then arithmetic: it applies a layout (ZeRO stage, tp, pp, dp) to a census,
following what DeepSpeed 0.19 allocates (its sources under ``runtime/zero/``; checked against
``tools/measure_memory.py`` in ``tests/distributed/test_planner.py``).
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from vlmtrain.config import TrainConfig
from vlmtrain.distributed.deepspeed_config import BUCKET_ELEMENTS, bucket_elements
from vlmtrain.errors import ConfigError
from vlmtrain.models.registry import spec_of
from vlmtrain.models.spec import TensorParallelPlan
from vlmtrain.optim import no_weight_decay

GiB = 2**30
ZERO3_PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed keeps parameters this small whole on every rank
ZERO0_ALLREDUCE_ELEMENTS = 500_000_000  # ZeRO 0 flattens gradients into copies of up to this many


@dataclass(frozen=True)
class Split:
    """An amount of which ``split`` is divided among the tensor-parallel ranks and ``whole`` is not."""
    split: int = 0
    whole: int = 0

    def per_rank(self, tp: int) -> int:
        return math.ceil(self.split / tp) + self.whole

    def __add__(self, other: Split) -> Split:
        return Split(self.split + other.split, self.whole + other.whole)


@dataclass(frozen=True)
class ParamInfo:
    name: str
    numel: int
    tp_split: bool  # matched by the tensor-parallel plan (a column weight and its bias, a row weight)
    layer: int = 0  # index of the pipeline layer holding it (0: a family without pipeline layers)
    group: int = 0  # its optimizer parameter group (ZeRO partitions each group's flat buffer)


@dataclass(frozen=True)
class Census:
    """What one model holds and saves, before any layout is applied.

    ``saved`` are bytes saved for backward by one micro-batch of ``batch`` samples, per block and
    ``rest`` outside the blocks (embeddings, pooling, the loss); ``block_inputs`` are the bytes of
    each block's input, what activation checkpointing keeps of a block. ``block_layers`` is the
    pipeline layer of each block and ``layers`` the number of pipeline layers.
    """
    params: tuple[ParamInfo, ...]
    batch: int
    saved: tuple[Split, ...]
    rest: Split
    block_inputs: tuple[int, ...]
    block_layers: tuple[int, ...]
    layers: int

    @property
    def blocks(self) -> int:
        return len(self.saved)


@dataclass(frozen=True)
class Layout:
    zero: int
    tp: int
    pp: int
    dp: int
    micro_batch: int
    micro_batches: int = 1  # per optimizer step (gradient accumulation; a pipeline's micro-batches)

    def describe(self) -> str:
        return f"ZeRO-{self.zero} tp={self.tp} pp={self.pp} dp={self.dp}"


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds (the heaviest pipeline stage's rank under pp)."""
    parameters: int
    gradients: int
    optimizer: int  # AdamW m and v, and ZeRO's fp32 master weights
    buffers: int  # DeepSpeed's gradient buckets
    activations: int
    activations_checkpointed: int

    @property
    def states(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.buffers

    def total(self, checkpointed: bool = False) -> int:
        return self.states + (self.activations_checkpointed if checkpointed else self.activations)


# ---------------------------------------------------------------- arithmetic


def pipeline_stages(census: Census, pp: int) -> list[range]:
    """The pipeline layers of each stage, as the pipeline engine partitions them (DeepSpeed's
    ``type:Block$`` method): transformer blocks balanced over the stages, the other layers going
    where DeepSpeed's partition puts them."""
    if pp == 1:
        return [range(census.layers)]
    from deepspeed.runtime.utils import partition_balanced

    carries_block = [int(layer in census.block_layers) for layer in range(census.layers)]
    parts = [int(bound) for bound in partition_balanced(carries_block, pp)]
    return [range(start, end) for start, end in zip(parts, parts[1:])]


def grads_held_by_partition(groups: list[list[int]], dp: int) -> int:
    """Gradient elements a ZeRO-1/2 rank holds: DeepSpeed flattens each parameter group, gives each
    rank an equal slice, and keeps the gradients of every parameter its slice touches, whole (a
    large embedding across a slice boundary is held by both ranks). The largest over ranks."""
    held = [0] * dp
    for numels in groups:
        size = math.ceil(sum(numels) / dp)
        offset = 0
        for numel in numels:
            first, last = offset // size, (offset + numel - 1) // size
            for rank in range(first, min(last, dp - 1) + 1):
                held[rank] += numel
            offset += numel
    return max(held)


def rank_memory(census: Census, layout: Layout, bf16: bool, bucket: int = BUCKET_ELEMENTS) -> RankMemory:
    """Per-rank bytes of ``layout``: the largest over its pipeline stages. Activations saved outside
    the blocks (embeddings, pooling, the loss: small) are counted on every stage."""
    return max((stage_memory(census, layout, bf16, bucket, stage, layers)
                for stage, layers in enumerate(pipeline_stages(census, layout.pp))),
               key=lambda memory: memory.total())


def stage_memory(census: Census, layout: Layout, bf16: bool, bucket: int, stage: int,
                 layers: range) -> RankMemory:
    held = [p for p in census.params if p.layer in layers]
    blocks = [b for b, layer in enumerate(census.block_layers) if layer in layers]
    per_rank = [math.ceil(p.numel / layout.tp) if p.tp_split else p.numel for p in held]
    groups = [[numel for p, numel in zip(held, per_rank) if p.group == g] for g in sorted({p.group for p in held})]
    n = sum(per_rank)
    width = 2 if bf16 else 4  # bytes of a working parameter, gradient and bucket element
    zero, dp = layout.zero, layout.dp
    shard = math.ceil(n / dp)
    if zero == 3:
        persistent = sum(numel for numel in per_rank if numel <= ZERO3_PERSISTENCE_THRESHOLD)
        parameters = width * (shard + persistent)
    else:
        parameters = width * n
    # ZeRO 0: every gradient, and the flat copy DeepSpeed all-reduces at the end of the backward.
    # ZeRO 1-3: the gradients of this rank's partition, plus the reduction bucket of ``bucket``
    # elements, or of the stage's whole model where smaller (the model before tensor parallelism
    # splits it, as the engine passes it). Copies made inside the optimizer step (bf16 gradients to
    # fp32) are not counted: activations are freed by then.
    if zero == 0:
        gradients, buffers = width * n, width * min(n, ZERO0_ALLREDUCE_ELEMENTS)
    else:
        partition = shard if zero == 3 else grads_held_by_partition(groups, dp)  # ZeRO-3 splits each parameter
        gradients, buffers = width * partition, width * bucket_elements(sum(p.numel for p in held), bucket)
    # AdamW's m and v in fp32; ZeRO keeps an fp32 master copy of its partition (also under fp32).
    optimizer = 8 * n + (4 * n if bf16 else 0) if zero == 0 else 12 * shard
    in_flight = min(layout.pp - stage, layout.micro_batches)  # 1F1B: stage s holds pp - s micro-batches
    scale = layout.micro_batch / census.batch
    saved = [census.saved[b].per_rank(layout.tp) for b in blocks]
    rest = census.rest.per_rank(layout.tp)
    activations = in_flight * scale * (sum(saved) + rest)
    checkpointed = in_flight * scale * (sum(census.block_inputs[b] for b in blocks) + rest) + \
        scale * max(saved, default=0)  # one block's recompute at a time
    return RankMemory(parameters, gradients, optimizer, buffers, round(activations), round(checkpointed))


# ---------------------------------------------------------------- the model on the meta device


def census(cfg: TrainConfig, batch: int) -> Census:
    """Parameters and saved activations of ``cfg``'s model for a micro-batch of ``batch``, measured
    on the meta device in the run's precision."""
    spec = spec_of(cfg.model)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    with torch.device("meta"):
        model = spec.build(cfg.model).to(dtype)
        inputs = {k: v.to(dtype) if v.is_floating_point() else v
                  for k, v in spec.example_inputs(cfg.model, batch).items()}
        loss_fn = spec.build_loss(cfg.model, None)
    blocks = transformer_blocks(model)
    layers = spec.pipeline_layers(model) if spec.pipeline_layers else [model]
    layer_of = {id(p): index for index, layer in enumerate(layers) for p in layer.parameters()}
    params = tuple(ParamInfo(name, p.numel(), tp_splits(name, spec.tp_plan), layer_of[id(p)],
                             group=int(no_weight_decay(name, p, spec.no_weight_decay)))  # build_optimizer's order
                   for name, p in model.named_parameters())
    block_layers = tuple(layer_of[id(next(block.parameters()))] for _, block in blocks)
    recorder = SavedTensors(model, blocks, spec.tp_plan)
    with recorder, torch.device("meta"):
        loss_fn(model(**inputs))["loss"]
    return Census(params, batch, tuple(recorder.saved), recorder.rest, tuple(recorder.inputs), block_layers,
                  len(layers))


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The elements of the model's ``nn.ModuleList``s (its transformer stacks): what pipeline
    stages share out and activation checkpointing wraps."""
    return [(f"{name}.{i}", child) for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) for i, child in enumerate(module)]


def tp_splits(name: str, plan: TensorParallelPlan) -> bool:
    """Whether tensor parallelism splits this parameter. A column-parallel layer splits its bias
    with its outputs; a row-parallel layer adds its bias after the all-reduce, whole."""
    def matches(patterns, key):
        return any(re.match(pattern, key) for pattern in patterns)

    weight_of_bias = name.removesuffix(".bias") + ".weight"
    return matches(plan.column + plan.row, name) or (name.endswith(".bias") and matches(plan.column, weight_of_bias))


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata  # unique per storage, also on the meta device


class _MemoryEfficientAttention(TorchFunctionMode):
    """Attention as GPUs run it in training (flash / memory-efficient kernels save q, k, v, the output
    and the log-sum-exp), where the meta device would take the math path and save the attention matrix."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and len(args) == 3 and kwargs.get("attn_mask") is None:
            q, k, v = args
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False))[0]
        return func(*args, **kwargs)


class _TensorParallelTaint(TorchDispatchMode):
    """Follows which tensors tensor parallelism splits: a column-parallel layer's output and
    everything computed from it, until a row-parallel layer's (all-reduced) output."""

    def __init__(self) -> None:
        super().__init__()
        self.split: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(_storage(t) in self.split for t in inputs):
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.split.add(_storage(t))
        return out


class SavedTensors:
    """Bytes saved for backward during one forward, by transformer block, each storage counted once
    (parameters are not activations), and each block's input bytes."""

    def __init__(self, model: nn.Module, blocks: list[tuple[str, nn.Module]], plan: TensorParallelPlan):
        self.model, self.blocks, self.plan = model, blocks, plan
        self.saved = [Split() for _ in blocks]
        self.inputs = [0 for _ in blocks]
        self.rest = Split()
        self.current: int | None = None
        self.seen: set[int] = set()
        self.taint = _TensorParallelTaint()
        self.keep: list[torch.Tensor] = []  # storages stay alive, so no identity is reused

    def __enter__(self) -> SavedTensors:
        self.params = {_storage(p) for p in self.model.parameters()}
        self.handles = list(self._hooks())
        self.modes = [torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t),
                      _MemoryEfficientAttention(), self.taint]
        for mode in self.modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self.modes):
            mode.__exit__(*exc)
        for handle in self.handles:
            handle.remove()

    def _hooks(self) -> Iterator[Any]:
        for index, (_, block) in enumerate(self.blocks):
            yield block.register_forward_pre_hook(self._enter_block(index))
            yield block.register_forward_hook(self._leave_block)
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear):
                weight = f"{name}.weight"
                if any(re.match(p, weight) for p in self.plan.column):
                    yield module.register_forward_hook(lambda m, a, out: self.taint.split.add(_storage(out)))
                elif any(re.match(p, weight) for p in self.plan.row):
                    yield module.register_forward_hook(lambda m, a, out: self.taint.split.discard(_storage(out)))

    def _enter_block(self, index: int):
        def hook(module, args):
            self.current = index
            self.inputs[index] += args[0].untyped_storage().nbytes()
        return hook

    def _leave_block(self, module, args, out) -> None:
        self.current = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage(tensor)
        if key in self.params or key in self.seen:
            return tensor
        self.seen.add(key)
        self.keep.append(tensor)
        nbytes = tensor.untyped_storage().nbytes()
        part = Split(nbytes, 0) if key in self.taint.split else Split(0, nbytes)
        if self.current is None:
            self.rest += part
        else:
            self.saved[self.current] += part
        return tensor


# ---------------------------------------------------------------- every layout of a run


@dataclass(frozen=True)
class PlanRow:
    layout: Layout | None
    zero: int
    tp: int
    pp: int
    memory: RankMemory | None = None
    excluded: str = ""  # why the run's rules refuse this layout


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layout_config(cfg: TrainConfig, world: int, zero: int, tp: int, pp: int,
                  global_batch: int | None) -> tuple[TrainConfig, Layout]:
    """``cfg`` at this layout, validated by the run's own rules (``ConfigError`` says why not)."""
    cfg = copy.deepcopy(cfg)
    cfg.zero_stage, cfg.parallel.tp, cfg.parallel.pp = zero, tp, pp
    dims = cfg.parallel_dims(world)
    if global_batch is not None:
        per_step = dims.dp * cfg.optim.grad_accum_steps
        if global_batch % per_step:
            raise ConfigError(f"global batch {global_batch} is not a multiple of dp × grad_accum_steps = {per_step}")
        cfg.data.batch_size = global_batch // per_step
    cfg.check()
    return cfg, Layout(zero, tp, pp, dims.dp, cfg.data.batch_size, cfg.optim.grad_accum_steps)


def plan(cfg: TrainConfig, world: int, global_batch: int | None = None) -> list[PlanRow]:
    """Every (ZeRO stage, tp, pp) with tp·pp dividing ``world``: its per-rank memory, or why not."""
    rows, censuses = [], {}
    for tp in divisors(world):
        for pp in divisors(world // tp):
            for zero in range(4):
                try:
                    run, layout = layout_config(cfg, world, zero, tp, pp, global_batch)
                except ConfigError as err:
                    rows.append(PlanRow(None, zero, tp, pp, excluded=str(err)))
                    continue
                if layout.micro_batch not in censuses:  # one meta forward per micro-batch size
                    censuses[layout.micro_batch] = census(run, layout.micro_batch)
                memory = rank_memory(censuses[layout.micro_batch], layout, cfg.precision == "bf16")
                rows.append(PlanRow(layout, zero, tp, pp, memory))
    return rows


def format_table(rows: list[PlanRow], gpu_mem_gib: float | None) -> str:
    """The plan as a fixed-width table in GiB; ``fits`` marks totals within ``gpu_mem_gib``."""
    head = (f"{'zero':>4} {'tp':>3} {'pp':>3} {'dp':>4} {'micro':>6} | {'params':>8} {'grads':>8} "
            f"{'optim':>8} {'buffers':>8} | {'act':>8} {'act_ckpt':>8} | {'total':>8} {'w/ ckpt':>8}")
    if gpu_mem_gib:
        head += "  fits"
    lines = [head, "-" * len(head)]
    excluded: dict[str, list[str]] = {}  # reason → layouts, so each reason is printed once
    for row in rows:
        if row.memory is None:
            excluded.setdefault(row.excluded, []).append(f"{row.zero}/{row.tp}/{row.pp}")
            continue
        m, lay = row.memory, row.layout
        gib = [value / GiB for value in (m.parameters, m.gradients, m.optimizer, m.buffers, m.activations,
                                         m.activations_checkpointed, m.total(), m.total(checkpointed=True))]
        line = (f"{lay.zero:>4} {lay.tp:>3} {lay.pp:>3} {lay.dp:>4} {lay.micro_batch:>6} | "
                + " ".join(f"{v:8.2f}" for v in gib[:4]) + " | " + " ".join(f"{v:8.2f}" for v in gib[4:6])
                + " | " + " ".join(f"{v:8.2f}" for v in gib[6:]))
        if gpu_mem_gib:
            line += "  " + fit_mark(m, gpu_mem_gib)
        lines.append(line)
    if excluded:
        lines += ["", "excluded by the run's rules (zero/tp/pp):"]
        lines += [f"  {', '.join(layouts)}: {reason}" for reason, layouts in excluded.items()]
    return "\n".join(lines)


def fit_mark(memory: RankMemory, gpu_mem_gib: float) -> str:
    """``yes``, ``ckpt`` (only with activation checkpointing) or ``no``."""
    if memory.total() <= gpu_mem_gib * GiB:
        return "yes"
    return "ckpt" if memory.total(checkpointed=True) <= gpu_mem_gib * GiB else "no"
