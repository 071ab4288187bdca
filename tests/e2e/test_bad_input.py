"""User mistakes end in one clear error line and a non-zero exit, never a library traceback."""
from pathlib import Path

import pytest

from tests.conftest import failure_text, run_tool

pytestmark = pytest.mark.e2e


def assert_one_clear_error(result, tool: str, *fragments: str) -> None:
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{tool}: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_train_with_a_missing_data_path(tmp_path):
    result = run_tool("vlm-train", "--config", "configs/train/demo.yaml", "--nproc-per-node", "2",
                      f"data.train_shards={tmp_path / 'nowhere'}", f"output_dir={tmp_path / 'run'}")
    assert_one_clear_error(result, "vlm-train", "data.train_shards", "nowhere")
    assert not (tmp_path / "run").exists()


def test_train_with_an_empty_shard_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_tool("vlm-train", "--config", "configs/train/demo.yaml",
                      f"data.train_shards={tmp_path / 'empty'}", f"output_dir={tmp_path / 'run'}")
    assert_one_clear_error(result, "vlm-train", "no .tar shards", "empty")


def test_train_with_fewer_shards_than_ranks_fails_before_launching_ranks(tmp_path, small_corpus):
    one_shard = small_corpus / "train" / "shard-000000.tar"
    result = run_tool("vlm-train", "--config", "configs/train/demo.yaml", "--nproc-per-node", "2",
                      f"data.train_shards={one_shard}", "data.workers=1", f"output_dir={tmp_path / 'run'}")
    assert_one_clear_error(result, "vlm-train", "1 shard(s) cannot feed 2 rank(s)")


def test_train_with_a_bad_config_value_fails_before_launching_ranks(tmp_path):
    result = run_tool("vlm-train", "--config", "configs/train/demo.yaml", "--nproc-per-node", "2",
                      "zero_stage=4", f"output_dir={tmp_path / 'run'}")
    assert_one_clear_error(result, "vlm-train", "'zero_stage'", "allowed values: 0, 1, 2, 3")


def test_eval_with_an_unreadable_checkpoint_directory(tmp_path, small_corpus):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "vlmtrain.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"\x00" * 16)
    result = run_tool("vlm-eval", "zeroshot", "--checkpoint", str(broken), "--data", str(small_corpus / "eval"))
    assert_one_clear_error(result, "vlm-eval", "unreadable", "vlmtrain.json")


def test_eval_with_a_directory_that_holds_no_checkpoint(tmp_path, small_corpus):
    result = run_tool("vlm-eval", "zeroshot", "--checkpoint", str(tmp_path), "--data", str(small_corpus / "eval"))
    assert_one_clear_error(result, "vlm-eval", "no model in", str(tmp_path), "expected an export")


def test_eval_with_a_missing_data_directory(tmp_path):
    result = run_tool("vlm-eval", "zeroshot", "--checkpoint", str(tmp_path), "--data", str(tmp_path / "nope"))
    assert_one_clear_error(result, "vlm-eval")


@pytest.mark.parametrize("ranks, overrides, fragments", [
    (3, ["parallel.tp=2"], ["3 rank(s) cannot be split", "parallel.tp=2"]),
    (2, ["parallel.tp=2", "model.text.heads=1", "model.vision.heads=1"], ["parallel.tp=2 does not divide", "heads=1"]),
    (2, ["parallel.pp=2", "zero_stage=2"], ["parallel.pp=2 needs zero_stage <= 1"]),
    (5, ["parallel.pp=5", "zero_stage=1"], ["parallel.pp=5 stages outnumber the model's 4 transformer layers"]),
], ids=["world_not_divisible", "heads_not_divisible", "pipeline_with_zero_2", "more_stages_than_layers"])
def test_an_impossible_layout_fails_before_launching_ranks(tmp_path, small_corpus, ranks, overrides, fragments):
    result = run_tool("vlm-train", "--config", "configs/train/demo.yaml", "--nproc-per-node", str(ranks),
                      f"data.train_shards={small_corpus / 'train'}", f"output_dir={tmp_path / 'run'}", *overrides)
    assert_one_clear_error(result, "vlm-train", *fragments)
    assert not (tmp_path / "run").exists()


def test_retraining_into_a_used_run_directory_is_refused_unless_overwritten(tmp_path, small_corpus):
    def train(*extra):
        return run_tool("vlm-train", "--config", "configs/train/demo.yaml", f"data.train_shards={small_corpus / 'train'}",
                        f"output_dir={tmp_path / 'run'}", "data.batch_size=8", "data.shuffle_buffer=8",
                        "optim.warmup_steps=1", "checkpoint.every=1", "checkpoint.keep=2", "progress=false",
                        "metrics.tensorboard=false", *extra)

    first = train("steps=3")
    assert first.returncode == 0, failure_text(first)
    again = train("steps=2")
    assert_one_clear_error(again, "vlm-train", "already holds a run", "resume=latest", "overwrite=true")

    fresh = train("steps=2", "overwrite=true")
    assert fresh.returncode == 0, failure_text(fresh)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_0000001", "step_0000002"]
    assert (checkpoints / "latest").read_text() == "step_0000002"


def test_a_second_training_run_into_the_same_directory_fails_at_once_naming_the_first(tmp_path, small_corpus):
    import subprocess
    import sys
    import time

    from tests.conftest import REPO, cli_env
    from tests.helpers import kill_tree

    arguments = ["--config", "configs/train/demo.yaml", f"data.train_shards={small_corpus / 'train'}",
                 f"output_dir={tmp_path / 'run'}", "steps=100000", "data.batch_size=8", "progress=false",
                 "metrics.tensorboard=false"]
    first = subprocess.Popen([str(Path(sys.executable).parent / "vlm-train"), *arguments], cwd=REPO, env=cli_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "run" / "config.json").is_file():
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.2)
        second = run_tool("vlm-train", *arguments, "overwrite=true")
        assert second.returncode == 2
        assert f"is being written by another process (pid {first.pid}:" in second.stderr
        assert (tmp_path / "run" / "config.json").is_file()  # overwrite=true deleted nothing
    finally:
        kill_tree(first.pid)
