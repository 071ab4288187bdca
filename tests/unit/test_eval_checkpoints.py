"""Specification of loading checkpoints for evaluation: our export, open_clip name + file,
open_clip local-dir, and the errors that name what was expected."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import TINY_CLIP as TINY, build_clip as build_model
from vlmtrain.checkpoint import META_FILE, WEIGHTS_FILE, write_export as write_export_files
from vlmtrain.configlib import to_dict
from vlmtrain.errors import CheckpointError
from vlmtrain.eval.checkpoints import load_eval_model
from vlmtrain.eval.datasets import open_eval_set
from vlmtrain.eval.suite import evaluate_dataset

from .test_eval_layouts import write_classification_sets



def write_export(model: torch.nn.Module, cfg, out_dir: Path) -> Path:
    write_export_files(model.state_dict(), cfg, out_dir, {})
    return out_dir


@pytest.fixture(scope="module")
def ours() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(TINY).eval()


@pytest.fixture(scope="module")
def classification_set(tmp_path_factory) -> Path:
    return write_classification_sets(tmp_path_factory.mktemp("sets"))["webdataset"]


def test_export_loads_with_our_tokenizer_and_transform(tmp_path, ours):
    loaded = load_eval_model(write_export(ours, TINY, tmp_path / "run" / "final"))

    assert loaded.source == "export"
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor, rtol=0, atol=0)
    assert loaded.tokenizer(["a cat"]).shape == (1, 16)
    assert loaded.transform.transforms[0].size == 32


def test_an_export_written_before_model_families_still_loads(tmp_path, ours):
    """Such exports said ``vlmtrain-clip`` and named the preset ``name``; SigLIP was the bias."""
    old = tmp_path / "final"
    old.mkdir()
    save_file(ours.state_dict(), str(old / WEIGHTS_FILE))
    model = {key: value for key, value in to_dict(TINY).items() if key not in ("family", "preset", "loss")}
    (old / META_FILE).write_text(json.dumps({"format": "vlmtrain-clip", "model": {"name": "tiny", **model}}))

    loaded = load_eval_model(old)
    assert (loaded.model.logit_bias, loaded.source) == (None, "export")
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor, rtol=0, atol=0)


def test_run_directory_loads_its_export(tmp_path, ours):
    write_export(ours, TINY, tmp_path / "final")

    assert load_eval_model(tmp_path).source == "export"


def test_our_export_loaded_as_open_clip_local_dir_gives_the_same_metrics(tmp_path, ours, classification_set):
    from vlmtrain.models.clip.openclip import write_openclip_dir

    export = write_export(ours, TINY, tmp_path / "final")
    folder = write_openclip_dir(ours.state_dict(), TINY, tmp_path / "open_clip")
    mine = load_eval_model(export)
    theirs = load_eval_model(model=f"local-dir:{folder}")

    assert isinstance(theirs.model, open_clip.model.CLIP)
    records = [evaluate_dataset(m.model, m.tokenizer, m.transform, open_eval_set(classification_set), "x", 8)
               for m in (mine, theirs)]
    assert records[0]["metrics"] == records[1]["metrics"]
    assert records[0]["confusion_matrix"] == records[1]["confusion_matrix"]
    assert 0 < records[0]["metrics"]["acc1"] < 1


def test_open_clip_model_name_with_local_weights_file(tmp_path, ours):
    from vlmtrain.models.clip.openclip import openclip_model_config, to_openclip_state_dict

    name = "vlmtrain-test-tiny"
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / f"{name}.json").write_text(json.dumps(openclip_model_config(TINY)))
    open_clip.add_model_config(config_dir)  # the way users register their own architectures
    weights = tmp_path / "tiny.safetensors"
    save_file(to_openclip_state_dict(ours.state_dict(), TINY), str(weights))

    loaded = load_eval_model(model=name, pretrained=str(weights))

    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(images), ours.encode_image(images), atol=1e-5, rtol=1e-5)
    assert loaded.source == "open_clip" and str(weights) in loaded.name


def test_open_clip_model_without_weights_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="needs --pretrained FILE.*not found: .*missing.pt"):
        load_eval_model(model="ViT-B-32", pretrained=str(tmp_path / "missing.pt"))


def test_open_clip_local_dir_without_weights_is_refused(tmp_path):
    (tmp_path / "open_clip_config.json").write_text("{}")

    with pytest.raises(CheckpointError, match="not an open_clip model folder: expected open_clip_config.json"):
        load_eval_model(model=f"local-dir:{tmp_path}")


def test_directory_without_any_checkpoint_says_what_was_expected(tmp_path):
    with pytest.raises(CheckpointError, match=r"no model in .*expected an export .*'latest' file"):
        load_eval_model(tmp_path)


def test_missing_checkpoint_path_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint path does not exist: .*nowhere"):
        load_eval_model(tmp_path / "nowhere")


def test_deepspeed_tag_that_does_not_exist_lists_the_tags(tmp_path):
    tag_dir = tmp_path / "checkpoints" / "step_0000010"
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"")

    with pytest.raises(CheckpointError, match="no DeepSpeed checkpoint .*step_0000020.*tags there: step_0000010"):
        load_eval_model(tmp_path, tag="step_0000020")


def test_deepspeed_checkpoint_without_model_config_names_both_places(tmp_path):
    tag_dir = tmp_path / "checkpoints" / "step_0000010"
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"")
    (tmp_path / "checkpoints" / "latest").write_text("step_0000010")

    with pytest.raises(CheckpointError, match=r"no model config .*vlmtrain_state.json.*config.json"):
        load_eval_model(tmp_path)
