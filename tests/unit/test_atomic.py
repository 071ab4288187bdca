"""Atomic file replacement: the target holds the old or the new content, never a part; temp names
are unique per writer and never left behind."""
from __future__ import annotations

import pytest

from vlmtrain import atomic


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "manifest.json"
    atomic.write_json(target, {"version": 1})
    with pytest.raises(RuntimeError):
        with atomic.replacing(target) as tmp:
            tmp.write_text('{"version": 2, "cut off')
            raise RuntimeError("disk full")
    assert target.read_text() == '{\n  "version": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_two_writers_never_share_a_temp_name(tmp_path):
    with atomic.replacing(tmp_path / "f") as first, atomic.replacing(tmp_path / "f") as second:
        assert first != second and first.parent == second.parent == tmp_path
        first.write_text("one")
        second.write_text("two")
    assert (tmp_path / "f").read_text() == "one"  # the outer block ends last: its content wins
