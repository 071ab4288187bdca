"""vlm-curate turns the project's user errors into one `error:` line (exit 2); a bug keeps its traceback."""
from __future__ import annotations

import pytest

from data_pipeline.cli import main


def test_a_user_error_is_one_error_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlm-curate: error: ") and "manifest.json not found" in err and err.count("\n") == 1


def test_a_bug_raising_a_plain_value_error_shows_its_traceback(tmp_path, monkeypatch):
    def buggy_report(out):  # what a pandas merge or a NaN check raises: a ValueError that is no user error
        raise ValueError("cannot reindex on an axis with duplicate labels")

    monkeypatch.setattr("data_pipeline.report.write_report", buggy_report)
    with pytest.raises(ValueError, match="duplicate labels"):
        main(["report", str(tmp_path)])
