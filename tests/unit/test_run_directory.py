"""A run directory holds one run: retraining into it is refused unless resumed or overwritten, and
pruning keeps the newest checkpoints of this run by step number."""
import pytest

from vlmtrain.checkpoint import check_output_dir, clear_run_dir, prune
from vlmtrain.config import load_train_config
from vlmtrain.errors import CheckpointError, ConfigError


def make_run(run_dir, *steps, export=False):
    for step in steps:
        (run_dir / "checkpoints" / f"step_{step:07d}").mkdir(parents=True)
    if export:
        (run_dir / "final").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    return run_dir


def test_a_directory_holding_a_run_is_refused_naming_both_ways_on(tmp_path):
    run = make_run(tmp_path / "run", 4, 8, export=True)
    with pytest.raises(CheckpointError, match=r"already holds a run \(step_0000004, step_0000008, final/\).*"
                                              r"resume=latest.*overwrite=true"):
        check_output_dir(run, resume="", overwrite=False)
    check_output_dir(run, resume="latest", overwrite=False)
    check_output_dir(run, resume="", overwrite=True)


def test_an_empty_or_log_only_directory_is_fine(tmp_path):
    check_output_dir(tmp_path / "new", resume="", overwrite=False)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.jsonl").write_text("")
    check_output_dir(tmp_path / "logs", resume="", overwrite=False)


def test_overwrite_clears_everything_the_old_run_wrote(tmp_path):
    run = make_run(tmp_path / "run", 4, export=True)
    clear_run_dir(run)
    assert list(run.iterdir()) == []


def test_pruning_keeps_the_newest_by_step_and_never_the_abandoned_future(tmp_path):
    # Resumed from step 4 of a run that had reached 900: step 900 is not "newer" than step 12.
    root = make_run(tmp_path / "run", 4, 8, 12, 900) / "checkpoints"
    prune(root, keep=2, step=12)
    assert sorted(p.name for p in root.iterdir()) == ["step_0000008", "step_0000012", "step_0000900"]


def test_pruning_orders_by_step_number_not_by_name(tmp_path):
    root = tmp_path / "checkpoints"
    for tag in ("step_99", "step_100", "step_0000101"):  # names from another writer's zero padding
        (root / tag).mkdir(parents=True)
    prune(root, keep=2, step=101)
    assert sorted(p.name for p in root.iterdir()) == ["step_0000101", "step_100"]


def test_resume_and_overwrite_together_are_refused():
    with pytest.raises(ConfigError, match="overwrite=true deletes the run that resume=latest would continue"):
        load_train_config("configs/train/demo.yaml", ["resume=latest", "overwrite=true"])


def test_a_torn_last_line_of_a_metrics_log_is_dropped_with_a_warning(tmp_path, caplog):
    from vlmtrain.metrics import StepLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # disk filled mid-line
    log = StepLog(path, resume_step=2)
    log.write({"step": 3, "loss": 1.0})
    log.close()
    assert path.read_text().splitlines() == ['{"step": 1, "loss": 2.0}', '{"step": 2, "loss": 1.5}',
                                             '{"step": 3, "loss": 1.0}']
    assert "cut off mid-write" in caplog.text


def test_a_checkpoint_saved_again_is_swapped_in_whole(tmp_path):
    from vlmtrain.checkpoint import exchange_directories

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "weights").write_text("old")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "weights").write_text("new")
    exchange_directories(tmp_path / "new", tmp_path / "old")
    assert (tmp_path / "old" / "weights").read_text() == "new"
    assert (tmp_path / "new" / "weights").read_text() == "old"
