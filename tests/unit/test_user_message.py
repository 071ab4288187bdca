"""Which exceptions the command-line tools turn into one `error:` line (errors.user_message)."""
import errno

from vlmtrain.errors import ConfigError, user_message


def test_a_full_disk_or_quota_is_a_user_error_naming_the_file_and_the_fix():
    message = user_message(OSError(errno.ENOSPC, "No space left on device", "/runs/a/final/model.safetensors"))
    assert message == ("No space left on device while writing /runs/a/final/model.safetensors: "
                       "free space there or choose another output_dir")
    assert "while writing the output directory" in user_message(OSError(errno.EDQUOT, "Disk quota exceeded"))


def test_other_os_errors_are_bugs_and_keep_their_traceback():
    assert user_message(OSError(errno.EIO, "Input/output error", "/runs/a")) is None
    assert user_message(RuntimeError("boom")) is None
    assert user_message(ConfigError("steps: must be >= 1")) == "steps: must be >= 1"
