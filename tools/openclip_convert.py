#!/usr/bin/env python
"""Convert CLIP weights between vlmtrain and open_clip.

  export  a vlmtrain export (``RUN/final`` or the run directory) → an open_clip folder that
          ``open_clip.create_model_and_transforms("local-dir:OUT")`` loads
          (``open_clip_config.json`` + ``open_clip_model.safetensors``)
  import  a file open_clip wrote (``torch.save(model.state_dict())``, an open_clip_train checkpoint
          or ``.safetensors``) → a vlmtrain export (``model.safetensors`` + ``vlmtrain.json``) that
          ``vlm-eval`` and ``vlmtrain.checkpoint.load_exported`` read

Examples:
  python tools/openclip_convert.py export runs/demo out/openclip_demo
  python tools/openclip_convert.py import epoch_32.pt out/imported --model ViT-B-32
  python tools/openclip_convert.py import weights.pt out/imported --model-config my_model.json

Only plain open_clip ViT CLIPs convert (GELU, learnable positions, class-token pooling); the error
names any setting that does not. Nothing is downloaded and nothing is unpickled.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from pathlib import Path

from vlmtrain.checkpoint import META_FILE, WEIGHTS_FILE, load_exported, write_export
from vlmtrain.cli import user_errors
from vlmtrain.models.clip.openclip import (OPENCLIP_CONFIG_FILE, OPENCLIP_WEIGHTS_FILE, OpenClipCompatError,
                                             load_openclip_checkpoint, model_config_from_openclip,
                                             write_openclip_dir)

PROG = "openclip_convert"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with user_errors(PROG):
        args.run(args)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="vlmtrain export → open_clip local-dir folder")
    export.add_argument("checkpoint", type=Path, help="run directory or its final/ export")
    export.add_argument("out", type=Path, help="folder to write open_clip_config.json and the weights into")
    export.add_argument("--force", action="store_true", help="overwrite files already in OUT")
    export.set_defaults(run=run_export)

    imp = commands.add_parser("import", help="open_clip weights file → vlmtrain export")
    imp.add_argument("checkpoint", type=Path, help="file open_clip wrote (.pt/.pth/.bin/.safetensors)")
    imp.add_argument("out", type=Path, help="folder to write model.safetensors and vlmtrain.json into")
    arch = imp.add_mutually_exclusive_group(required=True)
    arch.add_argument("--model", help="open_clip architecture name, e.g. ViT-B-32 (see open_clip.list_models())")
    arch.add_argument("--model-config", type=Path,
                      help="JSON open_clip model config, or an open_clip_config.json holding 'model_cfg'")
    imp.add_argument("--force", action="store_true", help="overwrite files already in OUT")
    imp.set_defaults(run=run_import)
    return parser.parse_args(argv)


def run_export(args: argparse.Namespace) -> None:
    refuse_overwrite(args.out, (OPENCLIP_CONFIG_FILE, OPENCLIP_WEIGHTS_FILE), args.force)
    model, model_cfg, _ = load_exported(args.checkpoint)
    write_openclip_dir(model.state_dict(), model_cfg, args.out)
    print(f"wrote {args.out / OPENCLIP_CONFIG_FILE} and {args.out / OPENCLIP_WEIGHTS_FILE}\n"
          f"load with: open_clip.create_model_and_transforms('local-dir:{args.out}')")


def run_import(args: argparse.Namespace) -> None:
    refuse_overwrite(args.out, (WEIGHTS_FILE, META_FILE), args.force)
    model_cfg = model_config_from_openclip(read_openclip_model_config(args))
    state = load_openclip_checkpoint(args.checkpoint, model_cfg)
    write_export(state, model_cfg, args.out, {"imported_from": str(args.checkpoint)})
    print(f"wrote {args.out / WEIGHTS_FILE} and {args.out / META_FILE} (model {model_cfg.preset})")


def read_openclip_model_config(args: argparse.Namespace) -> dict:
    if args.model:
        import open_clip

        model_cfg = open_clip.get_model_config(args.model)
        if model_cfg is None:
            close = difflib.get_close_matches(args.model, open_clip.list_models(), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise OpenClipCompatError(f"unknown open_clip model {args.model!r}{hint}")
        return model_cfg
    try:
        raw = json.loads(args.model_config.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise OpenClipCompatError(f"unreadable model config {args.model_config}: {err}") from None
    if not isinstance(raw, dict):
        raise OpenClipCompatError(f"{args.model_config} must hold a JSON object")
    return raw.get("model_cfg", raw)


def refuse_overwrite(out: Path, names: tuple[str, ...], force: bool) -> None:
    existing = [str(out / name) for name in names if (out / name).exists()]
    if existing and not force:
        raise OpenClipCompatError(f"{', '.join(existing)} already exist; pass --force to overwrite")


if __name__ == "__main__":
    sys.exit(main())
