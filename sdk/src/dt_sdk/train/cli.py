"""The ``dt train`` command (also ``python -m dt_sdk.train`` and ``accelerate launch -m dt_sdk.train``).

Registering it imports nothing heavy; torch and diffusers load when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DESCRIPTION = (
    "Train a template's Template model against a frozen diffusers backbone with the backbone's own "
    "objective (flow matching for FLUX.2), from a data set folder with samples.jsonl. Stage 1 caches "
    "what needs no gradient (latents, prompt embeddings, process_inputs) on disk; stage 2 trains from it."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--template", required=True, help="the template whose model is trained")
    parser.add_argument("--data", required=True, type=Path, help="data set folder with samples.jsonl")
    parser.add_argument("--out", required=True, type=Path, help="output folder (model + training.json)")
    parser.add_argument("--base", default=None, help="diffusers folder or hub id (default: embedded)")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also load pickle weights (.bin) from --base: only for files you trust",
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stage",
        choices=["all", "precompute", "train", "one"],
        default="all",
        help="all: stage 1 if its cache is missing, then stage 2; precompute: stage 1 only; "
        "train: stage 2 from an existing cache; one: both per batch, no cache (default: all)",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="stage-1 cache (default: OUT.stage1)")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute the denoiser's blocks in backward (less memory, more time)",
    )
    parser.add_argument("--model-config", default="{}", help="JSON object for the plugin's new_model(...)")
    parser.add_argument(
        "--call-kwargs",
        default="{}",
        help="JSON object: pipeline call arguments for encoding captions (e.g. "
        "text_encoder_out_layers, max_sequence_length); default: the base model's",
    )
    parser.add_argument("--init", type=Path, default=None, help="start from save_pretrained weights")
    parser.add_argument("--size", type=int, default=None, help="resize images to SIZE x SIZE")
    parser.add_argument("--caption-dropout", type=float, default=0.0)
    parser.add_argument("--max-rows", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` to the host CLI's sub-commands."""
    parser = subparsers.add_parser(
        "train", help="train a Template model (two-stage, accelerate-ready)", description=DESCRIPTION
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diffusion_templates.errors import TemplateError
    from pydantic import ValidationError

    from .config import TrainConfig, TrainError

    def fail(message: str) -> int:
        print(f"dt train: error: {message}", file=sys.stderr)
        return 2

    try:
        model_config = json.loads(args.model_config)
    except json.JSONDecodeError as exc:
        return fail(f"--model-config is not JSON: {exc}")
    if not isinstance(model_config, dict):
        return fail("--model-config must be a JSON object")
    try:
        call_kwargs = json.loads(args.call_kwargs)
    except json.JSONDecodeError as exc:
        return fail(f"--call-kwargs is not JSON: {exc}")
    if not isinstance(call_kwargs, dict):
        return fail("--call-kwargs must be a JSON object")
    try:
        cfg = TrainConfig(
            template=args.template,
            data=args.data,
            out=args.out,
            base=args.base,
            allow_pickle=args.allow_pickle,
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            seed=args.seed,
            gradient_checkpointing=args.gradient_checkpointing,
            cache_dir=args.cache_dir,
            model_config=model_config,
            init=args.init,
            size=args.size,
            caption_dropout=args.caption_dropout,
            max_rows=args.max_rows,
            log_every=args.log_every,
            save_every=args.save_every,
            call_kwargs=call_kwargs,
        )
    except ValidationError as exc:
        problems = "; ".join(f"--{'-'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return fail(problems.replace("_", "-"))
    from .stages import precompute, train

    progress = not args.no_progress
    try:
        if args.stage == "precompute":
            print(f"stage-1 cache written to {precompute(cfg, progress=progress)}")
            return 0
        record = train(cfg, stages=args.stage, progress=progress)
    except (TrainError, TemplateError) as exc:
        return fail(str(exc))
    if record is not None:
        losses = record["losses"]
        print(
            f"trained {record['steps']} steps in {record['seconds']['train']:.1f} s "
            f"(loss {losses[0]:.4f} -> {losses[-1]:.4f}); saved to {cfg.out}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dt_sdk.train", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
