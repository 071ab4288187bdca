"""open_clip interop: the same weights give the same embeddings in our CLIP and in open_clip's.

Both directions use random weights perturbed away from their init (LayerNorm scales ≠ 1, biases ≠ 0,
q/k/v all different), so a swapped, untransposed or misnamed tensor changes the embeddings.
"""
from __future__ import annotations

import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from tests.conftest import run_tool
from vlmtrain.checkpoint import load_exported
from tests.helpers import CLIP_SPEC, build_clip as build_model, clip_config
from vlmtrain.models.clip.openclip import (OpenClipCompatError, create_openclip_model, from_openclip_state_dict,
                                             load_openclip_checkpoint, model_config_from_openclip,
                                             openclip_model_config, to_openclip_state_dict, write_openclip_dir)

CAPTIONS = ["a photo of a cat", "a small red circle on the left", "two dogs playing in the snow", "7"]
TOLERANCE = 1e-5

# An open_clip architecture written the way open_clip's model_configs/*.json are: its own head_width,
# a different width per tower and an embed_dim of its own, so the config mapping is exercised too.
OPENCLIP_TINY = {
    "embed_dim": 48,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def tiny_config(siglip: bool = False):
    return clip_config(loss="siglip" if siglip else "clip")


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def inputs(image_size: int, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(len(CAPTIONS), 3, image_size, image_size, generator=torch.Generator().manual_seed(7))
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)(CAPTIONS)
    return images, tokens


@torch.no_grad()
def assert_same_embeddings(ours: torch.nn.Module, theirs: torch.nn.Module, cfg) -> None:
    images, tokens = inputs(cfg.vision.image_size, cfg.text.context_length)
    for encode in ("encode_image", "encode_text"):
        data = images if encode == "encode_image" else tokens
        expected = getattr(theirs, encode)(data, normalize=True)
        actual = getattr(ours, encode)(data, normalize=True)
        torch.testing.assert_close(actual, expected, atol=TOLERANCE, rtol=0, msg=f"{encode} differs")
    # The embeddings must differ between inputs, or equality above would prove little.
    assert F.pdist(ours.encode_image(images, normalize=True)).min() > 0.05
    assert F.pdist(ours.encode_text(tokens, normalize=True)).min() > 0.05


def logit_params(model: torch.nn.Module) -> list[float]:
    bias = [] if model.logit_bias is None else [model.logit_bias.item()]
    return [model.logit_scale.item(), *bias]


@pytest.fixture(scope="module")
def openclip_reference():
    """A tiny CLIP built by open_clip itself, perturbed, with our config derived from open_clip's."""
    torch.manual_seed(0)
    model = perturb(open_clip.model.CLIP(**OPENCLIP_TINY), seed=1)
    return model, model_config_from_openclip(OPENCLIP_TINY)


# ---------------------------------------------------------------- ours → open_clip


@pytest.mark.parametrize("siglip", [False, True], ids=["clip", "siglip-bias"])
def test_our_weights_give_open_clip_the_same_embeddings(siglip):
    cfg = tiny_config(siglip)
    torch.manual_seed(0)
    ours = perturb(build_model(cfg), seed=2)
    theirs = create_openclip_model(cfg)
    theirs.load_state_dict(to_openclip_state_dict(ours.state_dict(), cfg), strict=True)
    theirs.eval()
    assert_same_embeddings(ours, theirs, cfg)
    assert logit_params(theirs) == pytest.approx(logit_params(ours))
    assert theirs.logit_scale.dim() == 0 and ours.logit_scale.shape == (1,)


@pytest.mark.parametrize("siglip", [False, True], ids=["clip", "siglip-bias"])
def test_exported_folder_loads_through_open_clip_create_model_and_transforms(siglip, tmp_path):
    cfg = tiny_config(siglip)
    ours = perturb(build_model(cfg), seed=3)
    write_openclip_dir(ours.state_dict(), cfg, tmp_path / "oc")

    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    assert_same_embeddings(ours, theirs, cfg)
    assert logit_params(theirs) == pytest.approx(logit_params(ours))
    # open_clip's eval transform for this folder is the one our eval uses.
    image = Image.new("RGB", (50, 40), (200, 40, 90))
    torch.testing.assert_close(preprocess(image), CLIP_SPEC.image_transform(cfg, False)(image))
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")
    assert torch.equal(tokenizer(CAPTIONS), inputs(32, cfg.text.context_length)[1])


# ---------------------------------------------------------------- open_clip → ours


def save_plain(model, path):
    torch.save(model.state_dict(), path)


def save_training_checkpoint(model, path):
    """As open_clip_train writes it: a dict around a DDP-wrapped state dict."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "name": "tiny-run", "state_dict": state, "optimizer": {"state": {}}}, path)


def save_safetensors(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


@pytest.mark.parametrize("save, suffix", [(save_plain, ".pt"), (save_training_checkpoint, ".pt"),
                                          (save_safetensors, ".safetensors")],
                         ids=["state-dict", "open-clip-train-checkpoint", "safetensors"])
def test_open_clip_file_imports_with_the_same_embeddings(openclip_reference, tmp_path, save, suffix):
    theirs, cfg = openclip_reference
    path = tmp_path / f"weights{suffix}"
    save(theirs, path)

    ours = build_model(cfg)
    ours.load_state_dict(load_openclip_checkpoint(path, cfg), strict=True)
    assert_same_embeddings(ours.eval(), theirs, cfg)
    assert logit_params(ours) == pytest.approx(logit_params(theirs))


def test_siglip_logit_bias_imports(tmp_path):
    model_cfg = {**OPENCLIP_TINY, "init_logit_bias": -10.0, "init_logit_scale": math.log(10)}
    theirs = perturb(open_clip.model.CLIP(**model_cfg), seed=4)
    cfg = model_config_from_openclip(model_cfg)
    assert cfg.init_logit_bias == -10.0

    ours = build_model(cfg)
    ours.load_state_dict(from_openclip_state_dict(theirs.state_dict(), cfg), strict=True)
    assert_same_embeddings(ours.eval(), theirs, cfg)
    assert logit_params(ours) == pytest.approx(logit_params(theirs))


def test_round_trip_returns_the_identical_state_dict():
    cfg = tiny_config(siglip=True)
    state = perturb(build_model(cfg), seed=5).state_dict()
    back = from_openclip_state_dict(to_openclip_state_dict(state, cfg), cfg)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("openclip_name, preset", [("ViT-B-32", "vit_b_32"), ("ViT-B-16", "vit_b_16")])
def test_open_clip_vit_b_configs_map_to_our_presets(openclip_name, preset):
    cfg = model_config_from_openclip(open_clip.get_model_config(openclip_name))
    assert cfg == clip_config(preset)


def test_model_config_survives_a_trip_through_open_clip():
    cfg = tiny_config(siglip=True)
    assert model_config_from_openclip(openclip_model_config(cfg)) == cfg


@pytest.mark.parametrize("openclip_name, named", [
    ("ViT-B-32-quickgelu", "quick_gelu=True"),
    ("RN50", "vision_cfg.layers=[3, 4, 6, 3]"),
    ("ViT-B-16-SigLIP", "vision_cfg.timm_model_name"),
])
def test_unrepresentable_open_clip_config_names_the_setting(openclip_name, named):
    with pytest.raises(OpenClipCompatError, match="not representable") as err:
        model_config_from_openclip(open_clip.get_model_config(openclip_name))
    assert named in str(err.value)


# ---------------------------------------------------------------- bad files


def test_wrong_shape_file_names_the_key_and_both_shapes(openclip_reference, tmp_path):
    theirs, cfg = openclip_reference
    state = theirs.state_dict()
    state["visual.transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(7, 64)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(OpenClipCompatError) as err:
        load_openclip_checkpoint(path, cfg)
    message = str(err.value)
    assert str(path) in message
    assert "visual.transformer.resblocks.1.mlp.c_fc.weight: got (7, 64), expected (256, 64)" in message


def test_missing_and_unexpected_keys_are_named(openclip_reference, tmp_path):
    theirs, cfg = openclip_reference
    state = theirs.state_dict()
    del state["ln_final.weight"]
    state["visual.head.weight"] = torch.zeros(3)
    path = tmp_path / "incomplete.pt"
    torch.save(state, path)
    with pytest.raises(OpenClipCompatError, match=r"missing keys \[ln_final\.weight\].*"
                                                  r"unexpected keys \[visual\.head\.weight\]"):
        load_openclip_checkpoint(path, cfg)


def test_file_for_another_architecture_is_refused(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(create_openclip_model(tiny_config()).state_dict(), path)
    with pytest.raises(OpenClipCompatError, match="shape mismatch"):
        load_openclip_checkpoint(path, model_config_from_openclip(OPENCLIP_TINY))


def test_unreadable_file_names_the_path(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(OpenClipCompatError, match=f"unreadable open_clip checkpoint {path}"):
        load_openclip_checkpoint(path, tiny_config())


def test_our_state_dict_with_a_wrong_shape_is_refused_on_export():
    cfg = tiny_config()
    state = build_model(cfg).state_dict()
    state["text.proj.weight"] = torch.zeros(64, 63)
    with pytest.raises(OpenClipCompatError, match=r"text\.proj\.weight: got \(64, 63\), expected \(64, 64\)"):
        to_openclip_state_dict(state, cfg)


# ---------------------------------------------------------------- CLI


def test_cli_imports_an_open_clip_file_and_exports_it_back(openclip_reference, tmp_path):
    theirs, cfg = openclip_reference
    save_training_checkpoint(theirs, tmp_path / "epoch_3.pt")
    config_file = tmp_path / "tiny.json"
    config_file.write_text(json.dumps(OPENCLIP_TINY))

    imported = run_tool("tools/openclip_convert.py", "import", str(tmp_path / "epoch_3.pt"), str(tmp_path / "ours"),
                        "--model-config", str(config_file))
    assert imported.returncode == 0, imported.stderr
    ours, loaded_cfg, _ = load_exported(tmp_path / "ours")
    assert loaded_cfg == cfg
    assert_same_embeddings(ours, theirs, cfg)

    exported = run_tool("tools/openclip_convert.py", "export", str(tmp_path / "ours"), str(tmp_path / "oc"))
    assert exported.returncode == 0, exported.stderr
    reloaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    assert_same_embeddings(ours, reloaded, cfg)

    again = run_tool("tools/openclip_convert.py", "export", str(tmp_path / "ours"), str(tmp_path / "oc"))
    assert again.returncode == 2 and "already exist; pass --force" in again.stderr
