"""Command-line overrides arrive as typed: YAML values, except that text YAML would cut short (a
`#` comment, trailing text) stays the literal string; the bootstrap's paths arrive literally."""
from __future__ import annotations

import pytest

from data_pipeline.bootstrap import round_train_overrides
from data_pipeline.config import BootstrapConfig
from tests.conftest import REPO
from vlmtrain.config import load_train_config
from vlmtrain.configlib import apply_override
from vlmtrain.errors import ConfigError


def override(item: str):
    raw: dict = {}
    apply_override(raw, item)
    return raw["key"]


def test_yaml_values_are_typed():
    assert override("key=0.001") == 0.001 and override("key=3") == 3
    assert override("key=true") is True and override("key=[1, 2]") == [1, 2] and override("key=") == ""
    assert override("key='/runs/a #2'") == "/runs/a #2"  # quoted: YAML keeps it whole


@pytest.mark.parametrize("text", ["/runs/exp #2", "#2", "/runs/exp # note", "a b # c"])
def test_text_that_yaml_would_cut_at_a_comment_is_kept_whole(text):
    assert override(f"key={text}") == text


def test_a_list_with_trailing_text_is_refused_by_its_type():
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_train_config(REPO / "configs" / "train" / "demo.yaml", ["data.batch_size=[1, 2] # x"])


@pytest.mark.parametrize("name", ["exp #2", "it's \"quoted\"", "a: b", "  spaced  "])
def test_the_bootstrap_passes_paths_that_arrive_literally(tmp_path, name):
    shards, run = tmp_path / name / "shards", tmp_path / name / "run"
    cfg = BootstrapConfig(pool="p", output_dir=str(tmp_path))

    loaded = load_train_config(REPO / "configs" / "train" / "demo.yaml", round_train_overrides(cfg, shards, run))

    assert loaded.data.train_shards == str(shards) and loaded.output_dir == str(run)
