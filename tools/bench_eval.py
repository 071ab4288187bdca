"""Images/s of the zero-shot eval embedding loop vs a bare ``model.encode_image`` loop.

Both loops run in this process over the same pre-built batches (decoding excluded), alternating
rounds so that machine noise hits both alike; the best round of each counts. Prints the ratio
(target: eval loop >= 0.9x the bare loop).

    python tools/bench_eval.py                      # tiny model (width 64), CPU
    python tools/bench_eval.py --model vit_b_32 --batches 4 --batch-size 32
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from vlmtrain.eval.zeroshot import embed_images  # noqa: E402
from vlmtrain.models.registry import get_spec  # noqa: E402


def bare_loop(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: str) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for images, _ in batches:
            model.encode_image(images.to(device))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def eval_loop(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: str) -> float:
    start = time.perf_counter()
    embed_images(model, batches, device, progress=False)  # copies features to the CPU: synchronizes
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="model preset (default tiny)")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    spec = get_spec("clip")
    cfg = spec.resolve({"preset": args.model})
    model = spec.build(cfg).to(args.device).eval()
    size = cfg.vision.image_size
    batches = [(torch.randn(args.batch_size, 3, size, size), torch.arange(args.batch_size))
               for _ in range(args.batches)]
    images = args.batches * args.batch_size
    bare_loop(model, batches[:2], args.device)  # warm-up: allocator, kernels
    eval_loop(model, batches[:2], args.device)
    bare, ours = [], []
    for _ in range(args.rounds):
        bare.append(bare_loop(model, batches, args.device))
        ours.append(eval_loop(model, batches, args.device))
    bare_rate, our_rate = images / min(bare), images / min(ours)
    print(f"model {args.model} on {args.device}, {args.batches} batches x {args.batch_size} images, "
          f"{torch.get_num_threads()} threads, best of {args.rounds} rounds")
    print(f"bare encode_image loop : {bare_rate:10.1f} images/s")
    print(f"eval embedding loop    : {our_rate:10.1f} images/s")
    print(f"ratio eval/bare        : {our_rate / bare_rate:10.3f}x (target >= 0.9x)")


if __name__ == "__main__":
    main()
