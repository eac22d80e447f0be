"""``dt-base-shapes``: ``train``, ``evaluate``, ``dataset``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    overrides = json.loads(args.config) if args.config else {}
    for key in ("seed", "threads", "device", "n_images", "vae_steps", "steps", "batch"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    cfg = TrainConfig(**overrides)
    print(f"training with {cfg}", flush=True)
    record = train(args.out, cfg, log=lambda msg: print(msg, flush=True))
    print(
        f"vae {record['vae_seconds']:.0f} s, transformer {record['transformer_seconds']:.0f} s, "
        f"total {record['total_seconds']:.0f} s; {record['folder_bytes'] / 1e6:.1f} MB"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from . import CALL_KWARGS, load_pipeline
    from .evaluate import evaluate

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle)
    kwargs = dict(CALL_KWARGS)
    if args.steps:
        kwargs["num_inference_steps"] = args.steps
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    if args.device != "cpu":
        pipe.to(args.device)
    result = evaluate(pipe, kwargs, n=args.n, seed=args.seed, log=lambda m: print(m, flush=True))
    images = result.pop("images")
    rows = result.pop("rows")
    for name in ("reference", "vae_roundtrip", "generated"):
        acc = result[name]
        print(f"{name:>14}: " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
    print(f"generation: {len(images)} images in {result['generation_seconds']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "rows": rows}, indent=1) + "\n")
    if args.sheet:
        n = min(len(images), 64)
        cols = 8
        rows_n = (n + cols - 1) // cols
        grid = np.ones((rows_n * 64, cols * 64, 3))
        for i in range(n):
            r, c = divmod(i, cols)
            grid[r * 64 : (r + 1) * 64, c * 64 : (c + 1) * 64] = images[i]
        Image.fromarray((grid * 255).round().astype(np.uint8)).resize((cols * 128, rows_n * 128)).save(
            args.sheet
        )
    ok = result["generated"]["color"] >= 0.9 and result["generated"]["shape"] >= 0.8
    print("targets (colour >= 90%, shape >= 80%): " + ("met" if ok else "NOT met"))
    return 0


def _dataset(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from .data import ShapesDataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = ShapesDataset(args.n, seed=args.seed, split=args.split)
    with (out / "samples.jsonl").open("w") as f:
        for s in data:
            Image.fromarray(s.image).save(out / f"{s.index:05d}.png")
            Image.fromarray((s.mask * 255).astype(np.uint8)).save(out / f"{s.index:05d}_mask.png")
            a = s.attributes
            row = {
                "index": s.index,
                "caption": a.caption,
                "shape": a.shape,
                "color": a.color,
                "size": a.size,
                "position": a.position,
                "background": list(a.background),
                "bbox": list(s.bbox),
                "luminance": s.luminance,
            }
            f.write(json.dumps(row) + "\n")
    print(f"wrote {args.n} samples to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dt-base-shapes", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the VAE and the transformer; save a diffusers folder")
    p.add_argument("--out", required=True, help="folder to write (model_index.json, subfolders)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch threads (default 1: fastest on a shared machine)")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--n-images", dest="n_images", type=int)
    p.add_argument("--vae-steps", dest="vae_steps", type=int)
    p.add_argument("--steps", type=int, help="transformer steps")
    p.add_argument("--batch", type=int)
    p.add_argument("--config", help="JSON object of TrainConfig fields")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="generate for held-out captions and measure accuracy")
    p.add_argument("--model", help="a diffusers folder (default: the committed weights)")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also load pickle weights (.bin) from --model: only for files you trust",
    )
    p.add_argument("--n", type=int, default=64, help="held-out captions (one image each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the numbers and per-image results here")
    p.add_argument("--sheet", help="write a contact sheet of the generated images here")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("dataset", help="write samples of the synthetic data set (PNG + samples.jsonl)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=["train", "heldout", "all"])
    p.set_defaults(func=_dataset)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
