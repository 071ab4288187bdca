"""A full disk ends in one `error:` line naming the file being written and the fix, not a traceback.

The output directory is a tiny tmpfs mounted for the test (needs root and permission to mount; the
test is skipped with the reason otherwise)."""
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import failure_text, run_tool
from tests.helpers import TINY_CLIP, build_clip, train_command
from vlmtrain.checkpoint import write_export

pytestmark = pytest.mark.e2e


@contextmanager
def tiny_disk(mount_point: Path, size: str):
    """A tmpfs of ``size`` mounted at ``mount_point`` for the block; always unmounted after it."""
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount permission): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_vlm_train_with_a_full_disk_says_so_in_one_line(small_corpus, tmp_path):
    with tiny_disk(tmp_path / "disk", "2m") as disk:  # room for the logs, not for a checkpoint
        result = run_tool(*train_command(small_corpus, disk / "run", 1, "steps=2", "optim.warmup_steps=1",
                                         "checkpoint.every=1", "data.workers=0", "data.batch_size=8"))
    assert result.returncode == 2, failure_text(result)
    assert "Traceback" not in result.stderr, failure_text(result)
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("vlm-train: error: No space left on device while writing ")
    assert str(disk / "run" / "checkpoints" / ".staging" / "step_0000001") in error
    assert "free space there or choose another output_dir" in error


def test_an_export_that_fills_the_disk_names_its_file(tmp_path):
    with tiny_disk(tmp_path / "disk", "256k") as disk, pytest.raises(OSError) as raised:
        write_export(build_clip(TINY_CLIP).state_dict(), TINY_CLIP, disk / "final", {})
    assert raised.value.strerror == "No space left on device"
    assert raised.value.filename == str(disk / "final" / "model.safetensors")
