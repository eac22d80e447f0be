"""Training a Template model on this base model with ``dt train``: what every zoo recipe shares.

Each zoo package's ``shapes.py`` builds its own data set (what it controls, how captions leave it
out) and calls :func:`train_template`; the data set and the stage-1 cache live outside the package
(they never ship) and are rebuilt when they no longer match. ``dt-sdk`` is imported here only when
training (``pip install <package>[train]``).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import CALL_KWARGS


def data_dir(name: str) -> Path:
    """Default home of a recipe's data set and stage-1 cache (a temporary folder, never the package)."""
    return Path(tempfile.gettempdir()) / "dt-shapes-templates" / name


def ensure_rows(data: Path, build: Callable[..., Path], n: int, seed: int) -> Path:
    """``data/rows`` with ``n`` rows: built by ``build(folder, n=n, seed=seed)`` unless already there
    (a set of another size is removed with its stage-1 cache first)."""
    rows = data / "rows"
    index = rows / "samples.jsonl"
    if not index.is_file() or len(index.read_text().splitlines()) != n:
        for part in ("rows", "stage1"):  # only what a recipe writes there
            shutil.rmtree(data / part, ignore_errors=True)
        build(rows, n=n, seed=seed)
    return rows


def train_template(
    template: str,
    build: Callable[..., Path],
    out: str | Path,
    *,
    data: str | Path | None = None,
    n: int,
    seed: int = 0,
    log: Callable[[str], Any] = print,
    pipe: Any = None,
    plugins: Any = None,
    **config: Any,
) -> dict[str, Any]:
    """Build the data set (once) and train ``template``'s model on dt-base-shapes with ``dt train``.

    ``config`` goes to ``TrainConfig`` (steps, batch, lr, base, model_config, ...). Captions are
    encoded as this model encodes them, also for a ``base`` folder whose pipeline defaults differ.
    A stage-1 cache made for another base model or data set is computed again.
    """
    from dt_sdk.train import TrainConfig, train

    data = Path(data) if data is not None else data_dir(template)
    t0 = time.perf_counter()
    rows = ensure_rows(data, build, n, seed)
    log(f"{template}: data set {data} ready in {time.perf_counter() - t0:.1f} s")
    encoding = {k: CALL_KWARGS[k] for k in ("max_sequence_length", "text_encoder_out_layers")}
    cfg = TrainConfig(
        template=template, data=rows, out=Path(out), seed=seed, cache_dir=data / "stage1",
        call_kwargs=encoding, **config,
    )
    extra: dict[str, Any] = {"plugins": plugins} if plugins is not None else {}
    if pipe is not None:
        extra.update(pipe=pipe, call_kwargs=dict(CALL_KWARGS))
    record = train(cfg, progress=False, stale="recompute", **extra)
    log(f"{template}: trained {record['steps']} steps in {record['seconds']['total']:.0f} s -> {out}")
    return record


def recipe_parser(description: str, recipe: dict[str, Any], out: Path) -> argparse.ArgumentParser:
    """The command line every recipe takes: ``--out --data --steps --batch --lr --seed --base``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=str(out))
    parser.add_argument("--data", default=None, help="data set + stage-1 cache folder (default: a temp dir)")
    for name in ("steps", "batch", "seed"):
        parser.add_argument(f"--{name}", type=int, default=recipe[name])
    parser.add_argument("--lr", type=float, default=recipe["lr"])
    parser.add_argument(
        "--base", default=None, help="diffusers folder of the base model (default: dt-base-shapes)"
    )
    return parser


def kv_recipe(template: str, build: Callable[..., Path], recipe: dict[str, Any], out: Path, description: str):
    """``(train_shapes, main)`` of a zoo recipe: train ``template`` with ``recipe``'s settings into
    ``out`` by default, and its command line (``python -m <package>.shapes``)."""

    def train_shapes(
        out: str | Path = out,
        *,
        data: str | Path | None = None,
        steps: int = recipe["steps"],
        batch: int = recipe["batch"],
        lr: float = recipe["lr"],
        seed: int = recipe["seed"],
        n: int = recipe["n"],
        base: str | None = None,
        log: Callable[[str], Any] = print,
    ) -> dict[str, Any]:
        """Build the data set (once, in ``data``) and train on the base model (default: dt-base-shapes);
        writes ``save_pretrained(out)`` and ``out/training.json`` and returns the training record."""
        return train_template(
            template, build, out, data=data, n=n, seed=seed, log=log,
            steps=steps, batch=batch, lr=lr, base=base, log_every=25,
        )

    def main(argv: list[str] | None = None) -> None:
        args = recipe_parser(description, recipe, out).parse_args(argv)
        train_shapes(
            args.out, data=args.data, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
            base=args.base,
        )

    return train_shapes, main
