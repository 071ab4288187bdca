"""ParallelDims: the rank layout every part of the trainer agrees on, checked against brute force and
against DeepSpeed's own pipeline topology."""
import itertools

import pytest
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from vlmtrain.config import load_train_config
from vlmtrain.distributed.parallel_dims import ParallelDims
from vlmtrain.errors import ConfigError

LAYOUTS = [(1, 1, 1), (2, 1, 1), (2, 2, 1), (4, 2, 1), (4, 1, 2), (8, 2, 2), (12, 3, 2)]


@pytest.mark.parametrize("world, tp, pp", LAYOUTS)
def test_every_rank_has_one_coordinate_and_back(world, tp, pp):
    dims = ParallelDims(world, tp=tp, pp=pp)
    assert dims.dp * tp * pp == world
    coordinates = [dims.coordinates(rank) for rank in range(world)]
    assert sorted(coordinates) == list(itertools.product(range(pp), range(dims.dp), range(tp)))
    assert all(dims.rank_of(*c) == rank for rank, c in enumerate(coordinates))


@pytest.mark.parametrize("world, tp, pp", LAYOUTS)
def test_groups_partition_the_ranks_and_tensor_peers_are_consecutive(world, tp, pp):
    dims = ParallelDims(world, tp=tp, pp=pp)
    for groups, size in ((dims.dp_groups(), dims.dp), (dims.tp_groups(), tp), (dims.pp_groups(), pp)):
        assert sorted(r for g in groups for r in g) == list(range(world))
        assert all(len(g) == size for g in groups)
    # On 8-GPU nodes a tp group of ≤ 8 never straddles two nodes.
    assert all(g == list(range(g[0], g[0] + tp)) for g in dims.tp_groups())
    # Data-parallel peers share the model shard: same stage, same tensor rank.
    for group in dims.dp_groups():
        assert len({(dims.coordinates(r)[0], dims.coordinates(r)[2]) for r in group}) == 1


@pytest.mark.parametrize("world, tp, pp", LAYOUTS)
def test_the_order_is_deepspeeds_pipeline_topology(world, tp, pp):
    dims = ParallelDims(world, tp=tp, pp=pp)
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dims.dp)
    for rank in range(world):
        stage, dp_rank, tp_rank = dims.coordinates(rank)
        assert topology.get_rank(pipe=stage, data=dp_rank, model=tp_rank) == rank
    assert sorted(map(sorted, dims.dp_groups())) == sorted(map(sorted, topology.get_axis_comm_lists("data")))


@pytest.mark.parametrize("world, overrides, message", [
    (3, ["parallel.tp=2"], r"3 rank\(s\) cannot be split into parallel.tp=2 × parallel.pp=1"),
    (4, ["parallel.tp=3"], r"parallel.tp=3 does not divide model.vision.heads=2"),
    (4, ["parallel.pp=2", "zero_stage=2"], r"parallel.pp=2 needs zero_stage <= 1"),
    (4, ["parallel.pp=2", "parallel.tp=2", "zero_stage=1"], r"parallel.tp and parallel.pp cannot both be > 1"),
    (4, ["parallel.tp=0"], r"'parallel.tp': got 0, must be >= 1"),
])
def test_invalid_layouts_are_refused_naming_the_key(world, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config("configs/train/demo.yaml", overrides).parallel_dims(world)
