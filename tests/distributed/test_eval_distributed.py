"""Zero-shot evaluation on 2 gloo ranks gives exactly the records of a 1-process evaluation."""
import json
import os

import open_clip
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from open_clip.tokenizer import SimpleTokenizer

from tests.unit.conftest import CONTEXT_LENGTH, tiny_clip
from tests.unit.test_eval_layouts import write_classification_sets, write_retrieval_sets
from vlmtrain.distributed.env import free_port
from vlmtrain.eval.suite import evaluate_all

pytestmark = pytest.mark.dist
WORLD = 2


def evaluate(datasets: list[str]) -> list[dict]:
    # batch size 4 over 21 (20 decodable) images: the ranks get unequal batch counts and a short last batch
    return evaluate_all(tiny_clip(), SimpleTokenizer(context_length=CONTEXT_LENGTH),
                        open_clip.image_transform(32, is_train=False), datasets, model_name="tiny", batch_size=4)


def rank_worker(rank: int, port: int, datasets: list[str], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    records = evaluate(datasets)
    with open(f"{out_dir}/rank{rank}.json", "w") as handle:
        json.dump(records, handle)
    dist.barrier()  # no rank tears gloo down while a peer's last transfer is in flight
    dist.destroy_process_group()


def test_two_rank_evaluation_equals_one_process_on_every_rank(tmp_path):
    classification = write_classification_sets(tmp_path / "cls")
    retrieval = write_retrieval_sets(tmp_path / "ret")
    datasets = [str(classification["webdataset"]), str(classification["csv"]), str(retrieval["webdataset"]),
                str(retrieval["csv"])]

    mp.spawn(rank_worker, args=(free_port(), datasets, str(tmp_path)), nprocs=WORLD, join=True)
    reference = json.loads(json.dumps(evaluate(datasets)))  # no process group: one rank holds everything

    for rank in range(WORLD):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == reference, f"rank {rank}"
    assert [r["skipped_images"] for r in reference] == [1, 1, 1, 1]
    assert reference[0]["metrics"]["num_samples"] == 20
    assert 0 < reference[2]["metrics"]["text_retrieval_recall@1"] < 1
