"""Two real gloo ranks train the tiny CLIP under DeepSpeed ZeRO-2 and report what they did."""
import json

import pytest

from tests.conftest import failure_text, run_tool

pytestmark = pytest.mark.dist


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def two_rank_run(small_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two_rank_run")
    result = run_tool("vlm-train", "--config", "configs/train/demo.yaml", "--nproc-per-node", "2",
                      f"data.train_shards={small_corpus / 'train'}", f"output_dir={run_dir}",
                      "steps=80", "log_every=1", "data.batch_size=16", "data.shuffle_buffer=64",
                      "optim.warmup_steps=10", "optim.lr=2e-3", "progress=false",
                      "eval.every=40", f"eval.datasets=[{small_corpus / 'eval' / 'shapes'}]")
    assert result.returncode == 0, failure_text(result)
    return run_dir


def train_records(run_dir):
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def test_two_ranks_train_and_the_loss_goes_down(two_rank_run):
    losses = [r["loss"] for r in train_records(two_rank_run)]
    assert len(losses) == 80
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.25, f"loss did not go down: first {first:.3f}, last {last:.3f}"


def test_the_run_used_two_ranks_with_zero_2_partitions(two_rank_run):
    summary = json.loads((two_rank_run / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 32
    step_dir = two_rank_run / "checkpoints" / "step_0000080"
    partitions = sorted(p.name for p in step_dir.glob("*optim_states.pt"))
    assert partitions == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_each_step_reports_throughput_flops_and_memory(two_rank_run):
    record = train_records(two_rank_run)[-1]
    assert record["samples_per_s"] > 0 and record["step_time_s"] > 0
    assert 0 <= record["data_wait_frac"] < 1
    assert record["tflops_per_device"] > 0 and "mfu" not in record  # no peak FLOP/s known on CPU
    assert record["peak_mem_gb"] > 0.1


def test_curves_go_to_a_png_and_tensorboard(two_rank_run):
    assert (two_rank_run / "training_curves.png").stat().st_size > 10_000
    assert list((two_rank_run / "tensorboard").glob("events.out.tfevents.*"))


def test_corrupt_training_images_are_counted_and_skipped(two_rank_run, small_corpus):
    manifest = json.loads((small_corpus / "manifest.json").read_text())
    summary = json.loads((two_rank_run / "train_summary.json").read_text())
    assert manifest["noise_counts"]["corrupt_image"] > 0
    # 80 steps × 32 samples = 4 passes over 640 samples: each corrupt image is met about 4 times.
    assert summary["skipped_samples"] > 0


def test_in_training_eval_equals_vlm_eval_on_the_final_weights(two_rank_run, small_corpus, tmp_path):
    evals = [r for r in read_jsonl(two_rank_run / "metrics.jsonl") if "eval/shapes/acc1" in r]
    assert [r["step"] for r in evals] == [40, 80]

    out = tmp_path / "final.json"
    result = run_tool("vlm-eval", "zeroshot", "--checkpoint", str(two_rank_run),
                      "--data", str(small_corpus / "eval" / "shapes"), "--out", str(out), "--no-progress")
    assert result.returncode == 0, failure_text(result)
    [record] = json.loads(out.read_text())
    for name, value in record["metrics"].items():
        assert evals[-1][f"eval/shapes/{name}"] == pytest.approx(value, abs=1e-6), name
