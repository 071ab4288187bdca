"""Weights interchange with open_clip's ``CLIP``: state dicts, model configs, files and folders.

Our towers keep q/k/v as separate ``nn.Linear`` layers (so DeepSpeed AutoTP can shard them);
open_clip's ``nn.MultiheadAttention`` holds them stacked in ``in_proj_weight``/``in_proj_bias``.
Our output projections are ``nn.Linear`` (``y = x Wᵀ``) where open_clip keeps a bare matrix used as
``x @ proj``, so they are transposed. ``logit_scale``/``logit_bias`` have shape ``[1]`` here
(DeepSpeed cannot flatten 0-dim parameters) and shape ``[]`` in open_clip. Everything else (pre-norm
blocks, exact GELU, LayerNorm eps 1e-5, bias-free patch conv, class-token pooling after ``ln_post``,
causal text mask, argmax-EOT pooling) is the same computation, so embeddings agree to float rounding.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlmtrain.configlib import from_dict
from vlmtrain.errors import CheckpointError
from vlmtrain.models.clip.config import PRESETS, CLIPConfig
from vlmtrain.models.clip.model import CLIP
from vlmtrain.models.common.text import TextConfig
from vlmtrain.models.common.vision import VisionConfig

OPENCLIP_CONFIG_FILE = "open_clip_config.json"
OPENCLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
IMPORTED_PRESET = "openclip-import"

# Our key ↔ open_clip key. Exact names first, then substring swaps inside the towers.
_PROJECTIONS = {"visual.proj.weight": "visual.proj", "text.proj.weight": "text_projection"}
_PROJECTIONS_BACK = {theirs: ours for ours, theirs in _PROJECTIONS.items()}
_SWAPS = [("visual.patch_embed.", "visual.conv1."), (".transformer.blocks.", ".transformer.resblocks."),
          (".mlp.up_proj.", ".mlp.c_fc."), (".mlp.down_proj.", ".mlp.c_proj.")]
_SCALARS = ("logit_scale", "logit_bias")
_QKV = ("q_proj", "k_proj", "v_proj")
_QKV_KEY = re.compile(r"^(?P<block>.*\.attn)\.(?P<proj>[qkv]_proj)\.(?P<kind>weight|bias)$")
_IN_PROJ_KEY = re.compile(r"^(?P<block>.*\.attn)\.in_proj_(?P<kind>weight|bias)$")


class OpenClipCompatError(CheckpointError):
    """Weights or a config that cannot be converted; the message names the keys or fields at fault."""


# ---------------------------------------------------------------- model configs


def openclip_model_config(cfg: CLIPConfig) -> dict:
    """open_clip's model config (as in its ``model_configs/*.json``) for the same architecture."""
    vision, text = cfg.vision, cfg.text
    model_cfg: dict[str, Any] = {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {"image_size": vision.image_size, "patch_size": vision.patch_size,
                       "width": vision.width, "layers": vision.layers,
                       "head_width": vision.width // vision.heads, "mlp_ratio": vision.mlp_ratio},
        "text_cfg": {"context_length": text.context_length, "vocab_size": text.vocab_size,
                     "width": text.width, "heads": text.heads, "layers": text.layers,
                     "mlp_ratio": text.mlp_ratio},
        "quick_gelu": False,
        "init_logit_scale": cfg.init_logit_scale,
    }
    if cfg.init_logit_bias is not None:
        model_cfg["init_logit_bias"] = cfg.init_logit_bias
    return model_cfg


# The tower fields we map; every other open_clip field must keep open_clip's default (the
# computation our towers implement) unless it only steers open_clip's own loading or init.
_VISION_DIMS = {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio"}
_TEXT_DIMS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_VISION_IGNORED = {"attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained", "timm_pool",
                   "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"}
_TEXT_IGNORED = {"pad_id", "eos_id", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"}
_TOP_LEVEL = {"embed_dim", "vision_cfg", "text_cfg", "init_logit_scale", "init_logit_bias",
              "nonscalar_logit_scale", "output_dict"}
_TOP_LEVEL_OFF = ("quick_gelu", "custom_text")


def model_config_from_openclip(model_cfg: dict) -> CLIPConfig:
    """Our ``CLIPConfig`` for an open_clip model config, e.g. ``open_clip.get_model_config("ViT-B-32")``.

    Raises ``OpenClipCompatError`` listing every setting our towers do not implement (QuickGELU,
    timm/HF/ResNet towers, layer scale, other pooling, custom norms, ...).
    """
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    problems: list[str] = []
    for key, value in model_cfg.items():
        if key in _TOP_LEVEL_OFF:
            if value:
                problems.append(f"{key}={value!r} is not supported")
        elif key not in _TOP_LEVEL:
            problems.append(f"{key} is not supported")
    missing = [part for part in ("embed_dim", "vision_cfg", "text_cfg") if part not in model_cfg]
    if missing:
        raise OpenClipCompatError(f"open_clip model config lacks {', '.join(missing)}; it has {sorted(model_cfg)}")
    vision = _tower_fields(CLIPVisionCfg(), model_cfg["vision_cfg"], "vision_cfg",
                           _VISION_DIMS, _VISION_IGNORED, problems)
    text = _tower_fields(CLIPTextCfg(), model_cfg["text_cfg"], "text_cfg", _TEXT_DIMS, _TEXT_IGNORED, problems)
    image_size = _square(vision["image_size"], "vision_cfg.image_size", problems)
    patch_size = _square(vision["patch_size"], "vision_cfg.patch_size", problems)
    if not isinstance(vision["layers"], int):
        problems.append(f"vision_cfg.layers={vision['layers']!r} (a ResNet tower) is not supported")
    elif vision["width"] % vision["head_width"]:
        problems.append(f"vision_cfg.width={vision['width']} is not a multiple of "
                        f"vision_cfg.head_width={vision['head_width']}")
    if problems:
        raise OpenClipCompatError(f"open_clip model config is not representable by vlmtrain's CLIP: "
                                  f"{'; '.join(problems)}")
    bias = model_cfg.get("init_logit_bias")
    cfg = CLIPConfig(
        preset=IMPORTED_PRESET,
        loss="clip" if bias is None else "siglip",
        embed_dim=model_cfg["embed_dim"],
        vision=VisionConfig(image_size=image_size, patch_size=patch_size, width=vision["width"],
                            layers=vision["layers"], heads=vision["width"] // vision["head_width"],
                            mlp_ratio=float(vision["mlp_ratio"])),
        text=TextConfig(**{k: text[k] for k in _TEXT_DIMS if k != "mlp_ratio"},
                        mlp_ratio=float(text["mlp_ratio"])),
        init_logit_scale=float(model_cfg.get("init_logit_scale", CLIPConfig.init_logit_scale)),
        init_logit_bias=None if bias is None else float(bias),
    )
    cfg.preset = _matching_preset(cfg)
    return cfg


def _tower_fields(defaults: Any, given: dict, prefix: str, dims: set[str], ignored: set[str],
                  problems: list[str]) -> dict:
    """open_clip's defaults overlaid with ``given``; a changed field we do not implement is a problem."""
    fields = dataclasses.asdict(defaults)
    for key, value in given.items():
        if key not in fields:
            problems.append(f"{prefix}.{key} is not an open_clip setting")
        elif key not in dims | ignored and value != fields[key] and (value or fields[key]):
            problems.append(f"{prefix}.{key}={value!r} is not supported (only {fields[key]!r})")
        fields[key] = value
    return fields


def _square(value: Any, key: str, problems: list[str]) -> int:
    if isinstance(value, (list, tuple)) and len(set(value)) == 1:
        value = value[0]
    if not isinstance(value, int):
        problems.append(f"{key}={value!r} is not supported (only a single int: square images and patches)")
        return 0
    return value


def _matching_preset(cfg: CLIPConfig) -> str:
    """The preset with exactly these dimensions, so ``model.preset`` stays meaningful; else a marker."""
    dims = {k: v for k, v in dataclasses.asdict(cfg).items() if k in ("embed_dim", "vision", "text")}
    for name in PRESETS:
        preset = dataclasses.asdict(from_dict(CLIPConfig, PRESETS[name]))
        if all(preset[k] == v for k, v in dims.items()):
            return name
    return IMPORTED_PRESET


def create_openclip_model(cfg: CLIPConfig):
    """An ``open_clip.model.CLIP`` of the same architecture (random weights; builds offline)."""
    import open_clip

    return open_clip.model.CLIP(**openclip_model_config(cfg))


# ---------------------------------------------------------------- state dicts


def to_openclip_state_dict(state: dict[str, Tensor], cfg: CLIPConfig) -> dict[str, Tensor]:
    """Our model's state dict → one ``open_clip.model.CLIP`` loads with ``strict=True``."""
    _check_keys_and_shapes(state, _expected_shapes(CLIP, cfg), "vlmtrain CLIP")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        qkv = _QKV_KEY.match(key)
        if qkv:
            if qkv["proj"] == "q_proj":  # emit the stacked tensor once, at q
                parts = [state[f"{qkv['block']}.{proj}.{qkv['kind']}"] for proj in _QKV]
                out[_openclip_name(f"{qkv['block']}.in_proj_{qkv['kind']}")] = torch.cat(parts, dim=0)
            continue
        name = _openclip_name(key)
        if name in _SCALARS:
            value = value.reshape(())
        elif key in _PROJECTIONS:
            value = value.t()
        out[name] = value.contiguous()
    return out


def from_openclip_state_dict(state: dict[str, Tensor], cfg: CLIPConfig) -> dict[str, Tensor]:
    """An ``open_clip.model.CLIP`` state dict → one our ``CLIP(cfg)`` loads with ``strict=True``."""
    expected = _expected_shapes(create_openclip_model, cfg)
    # open_clip models built with nonscalar_logit_scale store [1]; accept either.
    state = {k: (v.reshape(()) if k in _SCALARS and v.numel() == 1 else v) for k, v in state.items()}
    _check_keys_and_shapes(state, expected, "open_clip CLIP")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        in_proj = _IN_PROJ_KEY.match(key)
        if in_proj:
            block = _our_name(in_proj["block"])
            for proj, part in zip(_QKV, value.chunk(3, dim=0)):
                out[f"{block}.{proj}.{in_proj['kind']}"] = part.contiguous()
            continue
        if key in _SCALARS:
            value = value.reshape(1)
        elif key in _PROJECTIONS_BACK:
            value = value.t()
        out[_our_name(key)] = value.contiguous()
    return out


def _openclip_name(ours: str) -> str:
    if ours in _SCALARS:
        return ours
    if ours in _PROJECTIONS:
        return _PROJECTIONS[ours]
    for mine, theirs in _SWAPS:
        ours = ours.replace(mine, theirs)
    return ours.removeprefix("text.")  # open_clip's CLIP keeps the text tower at the top level


def _our_name(theirs: str) -> str:
    if theirs in _SCALARS:
        return theirs
    if theirs in _PROJECTIONS_BACK:
        return _PROJECTIONS_BACK[theirs]
    name = theirs if theirs.startswith("visual.") else "text." + theirs
    for mine, their_part in _SWAPS:
        name = name.replace(their_part, mine)
    return name


def _expected_shapes(build, cfg: CLIPConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only: no memory, no init cost even for ViT-B
        model = build(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def _check_keys_and_shapes(state: dict[str, Tensor], expected: dict[str, torch.Size], what: str) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: got {tuple(state[k].shape)}, expected {tuple(expected[k])}"
             for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch {_few(wrong)}")
    if problems:
        raise OpenClipCompatError(f"state dict does not match a {what} of this config: " + "; ".join(problems))


def _few(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', … {len(items) - limit} more' if len(items) > limit else ''}] ({len(items)})"


# ---------------------------------------------------------------- files


def load_openclip_checkpoint(path: str | Path, cfg: CLIPConfig) -> dict[str, Tensor]:
    """Read weights open_clip wrote and convert them to our state dict.

    Accepts ``torch.save(model.state_dict())``, an open_clip_train checkpoint (``{"state_dict": …}``
    with DDP's ``module.`` prefixes) and ``.safetensors``. Never unpickles arbitrary objects.
    """
    path = Path(path)
    if not path.is_file():
        raise OpenClipCompatError(f"open_clip checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise many types for unreadable files
        raise OpenClipCompatError(f"unreadable open_clip checkpoint {path}: {err}") from None
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise OpenClipCompatError(f"{path} holds no state dict of tensors (got {type(state).__name__})")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        return from_openclip_state_dict(state, cfg)
    except OpenClipCompatError as err:
        raise OpenClipCompatError(f"{path}: {err}") from None


def write_openclip_dir(state: dict[str, Tensor], cfg: CLIPConfig, out_dir: str | Path) -> Path:
    """Write a folder ``open_clip.create_model_and_transforms("local-dir:" + out_dir)`` loads."""
    from open_clip.transform import PreprocessCfg
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    weights = to_openclip_state_dict(state, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in weights.items()},
              str(out_dir / OPENCLIP_WEIGHTS_FILE))
    # Our loader uses open_clip's image_transform defaults (OpenAI mean/std, bicubic, shortest side).
    preprocess = dataclasses.asdict(PreprocessCfg(size=cfg.vision.image_size))
    config = {"model_cfg": openclip_model_config(cfg), "preprocess_cfg": preprocess}
    (out_dir / OPENCLIP_CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out_dir
