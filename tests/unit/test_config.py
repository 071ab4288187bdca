"""The run config: YAML + overrides into typed dataclasses, with mistakes named precisely."""
from pathlib import Path

import pytest

from vlmtrain.config import load_train_config
from vlmtrain.errors import ConfigError

DEMO = Path(__file__).resolve().parents[2] / "configs" / "train" / "demo.yaml"


def test_demo_config_loads_the_tiny_preset_with_its_own_keys_on_top():
    cfg = load_train_config(DEMO)
    assert (cfg.model.family, cfg.model.preset) == ("clip", "tiny")
    assert cfg.model.vision.width == 64 and cfg.model.text.width == 64  # from the preset
    assert cfg.model.text.context_length == 24  # demo.yaml overrides the preset's 32
    assert cfg.zero_stage == 2


def test_overrides_reach_nested_keys_and_are_typed():
    cfg = load_train_config(DEMO, ["optim.lr=5e-4", "zero_stage=1", "model.vision.layers=3"])
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.zero_stage == 1
    assert cfg.model.vision.layers == 3
    assert cfg.model.vision.width == 64  # the rest of the preset is kept


def test_model_preset_selects_the_preset_dimensions():
    cfg = load_train_config(DEMO, ["model.preset=vit_b_16"])
    assert (cfg.model.vision.patch_size, cfg.model.vision.width, cfg.model.embed_dim) == (16, 768, 512)


def test_configs_written_before_model_families_still_load_with_a_note(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  name: vit_b_32\nloss: siglip\ndata:\n  train_shards: x\n")
    with pytest.warns(UserWarning, match="'model.name' is now 'model.preset'"):
        cfg = load_train_config(old)
    assert (cfg.model.family, cfg.model.preset, cfg.model.loss) == ("clip", "vit_b_32", "siglip")
    assert cfg.model.init_logit_bias == -10.0


def test_misspelled_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        load_train_config(DEMO, ["optim.lrr=1e-3"])


def test_misspelled_key_in_yaml_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO.read_text().replace("batch_size:", "batchsize:"))
    with pytest.raises(ConfigError, match=r"'data.batchsize'.*'data.batch_size'"):
        load_train_config(bad)


@pytest.mark.parametrize("override, message", [
    ("zero_stage=5", r"'zero_stage': got 5, allowed values: 0, 1, 2, 3"),
    ("precision=fp8", r"'precision': got 'fp8', allowed values: fp32, bf16"),
    ("model.preset=vit_huge", r"'model.preset': got 'vit_huge', allowed values for family 'clip': tiny, vit_b_32"),
    ("model.family=gpt", r"'model.family': got 'gpt', allowed values: clip"),
    ("data.batch_size=0", r"'data.batch_size': got 0, must be >= 1"),
    ("steps=ten", r"'steps' must be int, got 'ten'"),
    ("model.vision.patch_size=7", r"model.vision.image_size=32 is not divisible by model.vision.patch_size=7"),
    ("model.text.heads=3", r"model.text.width=64 is not divisible by model.text.heads=3"),
    ("data.train_shards=", r"exactly one of data.train_shards .* and data.sources"),
    ("data.sources=[{shards: a, weight: -1}]", r"'data.sources\[0\].weight': got -1.0, must be >= 0"),
    ("data.sources=[{weight: 2}]", r"'data.sources\[0\].shards' is required"),
    ("model.loss=infonce", r"'model.loss': got 'infonce', allowed values: clip, siglip"),
    ("model.init_logit_bias=-10", r"init_logit_bias is only used by model.loss=siglip"),
    ("optim.offload=true|zero_stage=0", r"optim.offload=true needs zero_stage >= 1"),
    ("precision=bf16|zero_stage=0", r"precision=bf16 needs zero_stage >= 1"),
])
def test_invalid_values_are_rejected_naming_key_and_allowed_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(DEMO, override.split("|"))  # "|" separates several overrides


def test_siglip_loss_alone_gives_the_model_siglip_init():
    cfg = load_train_config(DEMO, ["model.loss=siglip"])
    assert cfg.model.init_logit_bias == -10.0
    assert cfg.model.init_logit_scale == pytest.approx(2.302585, abs=1e-6)  # log 10


def test_sources_mix_several_shard_sets_by_weight():
    cfg = load_train_config(DEMO, ["data.train_shards=", "data.sources=[{shards: a/, weight: 3}, {shards: b/}]"])
    assert [(s.shards, s.weight) for s in cfg.data.source_list()] == [("a/", 3.0), ("b/", 1.0)]


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_train_config(DEMO, ["steps"])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_train_config(tmp_path / "nope.yaml")
