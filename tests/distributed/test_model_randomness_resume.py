"""A CLIP with random per-step computation (FLIP patch dropout, drop-path in both towers) resumes
exactly: the trainer seeds the model's RNG per (seed, step, micro-batch, data-parallel rank), so the
steps replayed after a resume draw what the killed run drew. Restoring each rank's saved RNG state is
not enough: the global RNG is drawn from between the restore and the first step (the DataLoader takes
its base seed from it), and with the per-micro-batch seeding switched off this test fails (the
replayed step's loss was 3.69 instead of 3.37)."""
import pytest

from tests.conftest import failure_text, run_tool
from tests.helpers import keys_per_step, kill_at_failpoint, losses, train_command

pytestmark = pytest.mark.dist


def test_patch_dropout_and_drop_path_resume_exactly(small_corpus, tmp_path):
    command = train_command(small_corpus, tmp_path, 2, "steps=3", "checkpoint.every=1", "data.batch_size=8",
                            "data.workers=1", "data.shuffle_buffer=16", "data.record_keys=true", "log_every=1",
                            "optim.warmup_steps=1", "model.vision.patch_dropout=0.5", "model.vision.drop_path=0.3",
                            "model.text.drop_path=0.3")
    # Rank 0 dies once step 2's checkpoint is in place but before `latest` names it: resume from step 1.
    kill_at_failpoint(command, "renamed@step_0000002")
    killed, killed_keys = losses(tmp_path), keys_per_step(tmp_path)
    assert sorted(killed) == [1, 2]
    result = run_tool(*command, "resume=latest")
    assert result.returncode == 0, failure_text(result)
    assert "at step 1" in result.stdout
    resumed, resumed_keys = losses(tmp_path), keys_per_step(tmp_path)
    assert sorted(resumed) == [1, 2, 3]
    assert resumed_keys[0, 2] == killed_keys[0, 2] and resumed_keys[1, 2] == killed_keys[1, 2]
    assert resumed[2] == pytest.approx(killed[2], abs=1e-6)
