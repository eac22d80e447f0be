"""The two stages of training, and the one-pass alternative.

* stage 1, :func:`precompute`: per data row, with no gradient, the objective's tensors (VAE latents,
  prompt embeddings, their position ids) and the Template model's ``process_inputs``; written to the
  stage-1 cache (``stage1.py``).
* stage 2, :func:`train`: per step, a batch of cached rows, the Template model's differentiable
  ``forward``, the plugin's ``to_cache``, the caches injected into the frozen denoiser
  (``TemplatePipeline.injecting``) and the backbone's own loss; AdamW on the Template model only.

``train(cfg, stages="one")`` computes stage 1's work for each batch instead of reading it. Noise,
timesteps and caption dropout come from a generator seeded per step (and process), so both ways
give the same loss on the same batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import StaleCacheError, TrainConfig, TrainError
from .session import Session, checkpointing, frozen, open_session
from .stage1 import Features, Stage1Reader, Stage1Writer, read_index

Stages = Literal["all", "train", "one"]


# -- stage 1 -------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_row(session: Session, model: Any, index: int) -> Features:
    """Stage 1 for one row: the objective's tensors and ``model.process_inputs`` (batch dim 1)."""
    from PIL import Image

    row = session.rows[index]
    with Image.open(row.image) as image:
        image = image.convert("RGB")
    data = {**session.objective.encode_image(image, session.cfg.size)}
    data.update(session.objective.encode_caption(row.caption))
    inputs = model.process_inputs(row.inputs, session.context)
    if not isinstance(inputs, dict):
        raise TrainError(
            f"template {session.cfg.template!r}: process_inputs must return a dict of forward arguments, "
            f"got {type(inputs).__name__}"
        )
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and (value.ndim == 0 or value.shape[0] != 1):
            raise TrainError(
                f"template {session.cfg.template!r}: process_inputs returned {name!r} with shape "
                f"{tuple(value.shape)}; tensors need a leading batch dim of 1 (rows are concatenated)"
            )
    return data, inputs


def precompute(
    cfg: TrainConfig,
    *,
    pipe: Any = None,
    call_kwargs: dict[str, Any] | None = None,
    plugins: Any = None,
    progress: bool = True,
) -> Path:
    """Run stage 1 and write the stage-1 cache to ``cfg.stage1_dir`` (replacing what is there)."""
    device = "cuda" if pipe is None and torch.cuda.is_available() else None  # a base model we load
    session = open_session(cfg, pipe=pipe, call_kwargs=call_kwargs, plugins=plugins, device=device)
    return _precompute(session, progress)


def _precompute(session: Session, progress: bool) -> Path:
    model = session.new_model().eval()
    writer = Stage1Writer(session.cfg.stage1_dir, session.fingerprint())
    for i in tqdm(range(len(session.rows)), desc="dt train: stage 1", disable=not progress):
        writer.add(*encode_row(session, model, i))
    writer.add_extra("empty", session.objective.encode_caption(""))
    return writer.close()


# -- batches -------------------------------------------------------------------------------------------
def sample_order(rows: int, samples: int, seed: int) -> list[int]:
    """Row indices for ``samples`` samples: a fresh permutation each epoch, seeded by (seed, epoch)."""
    order: list[int] = []
    epoch = 0
    while len(order) < samples:
        order += np.random.default_rng([seed, epoch]).permutation(rows).tolist()
        epoch += 1
    return order[:samples]


def step_generator(seed: int, step: int, process: int = 0) -> torch.Generator:
    """The generator of one step's noise, timesteps and caption dropout (whatever fed the batch)."""
    state = np.random.SeedSequence([seed, step, process]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def collate(features: Sequence[Features], template: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Rows -> a batch: tensors concatenated on dim 0; plain values must agree within the batch."""
    data: dict[str, torch.Tensor] = {}
    for name in features[0][0]:
        parts = [f[0][name] for f in features]
        if len({tuple(p.shape[1:]) for p in parts}) > 1:
            raise TrainError(
                f"rows of one batch differ in {name!r} shape ({sorted({tuple(p.shape) for p in parts})}): "
                "give every image the same size (or pass --size) and every caption the same settings"
            )
        data[name] = torch.cat(parts)
    kwargs: dict[str, Any] = {}
    for name, first in features[0][1].items():
        values = [f[1][name] for f in features]
        if isinstance(first, torch.Tensor):
            kwargs[name] = torch.cat(values)
        elif any(v != first for v in values):
            raise TrainError(
                f"template {template!r}: process_inputs returned different values for {name!r} within one "
                f"batch ({values}); return a tensor, or train with batch 1"
            )
        else:
            kwargs[name] = first
    return data, kwargs


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def step_loss(
    session: Session,
    model: torch.nn.Module,
    features: Sequence[Features],
    step: int,
    empty: dict[str, torch.Tensor],
    backward: Callable[[torch.Tensor], None] | None = None,
    process: int = 0,
) -> torch.Tensor:
    """One training step's loss (and its ``backward``, inside the injection, when given)."""
    cfg = session.cfg
    data, kwargs = collate(features, cfg.template)
    generator = step_generator(cfg.seed, step, process)
    draw = session.objective.draw(data["x0"], generator, cfg.timesteps)
    drop = torch.rand(data["x0"].shape[0], generator=generator) < cfg.caption_dropout
    if drop.any():  # the pipeline's CFG negative is the empty caption
        for name, tensor in empty.items():
            rows = drop.view(-1, *[1] * (tensor.ndim - 1))
            data[name] = torch.where(rows, tensor.expand_as(data[name]), data[name])
    device = session.adapter.device
    representation = model(**{k: _to(v, device) for k, v in kwargs.items()})
    caches = session.plugins.call(
        "template", cfg.template, "to_cache", template=cfg.template, representation=representation,
        context=session.context,
    )
    caches = caches if isinstance(caches, (list, tuple)) else [caches]
    with session.tpipe.injecting(templates=caches):
        loss = session.objective.loss(session.denoiser, data, draw)
        if backward is not None:  # inside: checkpointed blocks recompute with the injection in place
            backward(loss)
    return loss


# -- stage 2 -------------------------------------------------------------------------------------------
class _Plain:
    """The few ``accelerate.Accelerator`` members the loop uses, for one process without accelerate."""

    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self, device: torch.device):
        self.device = device

    def prepare(self, *objects: Any) -> tuple[Any, ...]:
        return objects

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, parameters: Any, norm: float) -> Any:
        return torch.nn.utils.clip_grad_norm_(parameters, norm)

    def unwrap_model(self, model: Any) -> Any:
        return model

    def wait_for_everyone(self) -> None:
        pass


def make_accelerator(pipe: Any) -> Any:
    """``accelerate.Accelerator`` when installed (``accelerate launch`` configures it), else one process."""
    try:
        from accelerate import Accelerator
    except ImportError:
        device = next(pipe.transformer.parameters()).device if pipe is not None else torch.device("cpu")
        return _Plain(device)
    if pipe is not None:  # a pipeline handed in stays where it is
        return Accelerator(cpu=next(pipe.transformer.parameters()).device.type == "cpu")
    return Accelerator()


def train(
    cfg: TrainConfig,
    *,
    stages: Stages = "all",
    pipe: Any = None,
    call_kwargs: dict[str, Any] | None = None,
    plugins: Any = None,
    progress: bool = True,
    stale: Literal["refuse", "recompute"] = "refuse",
) -> dict[str, Any]:
    """Train the template's model; save it to ``cfg.out`` with ``training.json``; return that record.

    ``stages``: ``"all"`` runs stage 1 first when its cache is missing, then stage 2 from the cache;
    ``"train"`` needs the cache; ``"one"`` computes stage 1's work per batch and writes no cache.
    A stale cache (another base model, template or data set) is refused, or with
    ``stale="recompute"`` (and ``stages="all"``) computed again, as scripted retraining wants.
    """
    if stages not in ("all", "train", "one"):
        raise TrainError(f"stages must be 'all', 'train' or 'one', not {stages!r}")
    started = time.perf_counter()
    accelerator = make_accelerator(pipe)
    session = open_session(
        cfg, pipe=pipe, call_kwargs=call_kwargs, plugins=plugins,
        device=accelerator.device if pipe is None else None,
    )
    stage1_seconds = 0.0
    model = session.new_model()
    if stages == "one":
        def features(i: int) -> Features:
            return encode_row(session, accelerator.unwrap_model(model), i)

        with torch.no_grad():
            empty = session.objective.encode_caption("")
    else:

        def run_stage1() -> float:
            t0 = time.perf_counter()
            if accelerator.is_main_process:
                _precompute(session, progress)
            accelerator.wait_for_everyone()
            return time.perf_counter() - t0

        if read_index(cfg.stage1_dir) is None:
            if stages == "train":
                raise TrainError(
                    f"no stage-1 cache in {cfg.stage1_dir}: run stage 1 first (--stage precompute)"
                )
            stage1_seconds = run_stage1()
        try:
            reader = Stage1Reader(cfg.stage1_dir, session.fingerprint())
        except StaleCacheError:
            if stale != "recompute" or stages == "train":
                raise
            stage1_seconds = run_stage1()  # precompute replaces the whole cache
            reader = Stage1Reader(cfg.stage1_dir, session.fingerprint())
        if len(reader) != len(session.rows):
            raise TrainError(
                f"stage-1 cache {cfg.stage1_dir} has {len(reader)} rows, the data set {len(session.rows)}"
            )
        features, empty = reader.__getitem__, reader.extra("empty")

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    order = sample_order(len(session.rows), cfg.steps * cfg.batch * accelerator.num_processes, cfg.seed)
    loader = torch.utils.data.DataLoader(order, batch_size=cfg.batch, collate_fn=list)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses: list[float] = []
    t0 = time.perf_counter()
    show = progress and accelerator.is_main_process
    model.train()
    with (
        tqdm(total=cfg.steps, desc="dt train", disable=not show) as bar,
        frozen(session.pipe),
        checkpointing(session.denoiser, cfg.gradient_checkpointing),
    ):
        for step, indices in enumerate(loader):
            if step >= cfg.steps:
                break
            loss = step_loss(
                session, model, [features(i) for i in indices], step, empty,
                backward=accelerator.backward, process=accelerator.process_index,
            )
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise TrainError(f"loss became {losses[-1]} at step {step}; lower --lr")
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            if cfg.log_every and (step + 1) % cfg.log_every == 0:
                mean = f"{np.mean(losses[-cfg.log_every:]):.4f}"
                if show:
                    bar.set_postfix(loss=mean)
                elif accelerator.is_main_process:  # no bar (logs, --no-progress): a line instead
                    print(f"step {step + 1}/{cfg.steps} loss {mean}", flush=True)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and accelerator.is_main_process:
                accelerator.unwrap_model(model).save_pretrained(cfg.out)
    train_seconds = time.perf_counter() - t0
    model.eval()
    record = {
        "config": cfg.as_json(),
        "template": cfg.template,
        "stages": stages,
        "rows": len(session.rows),
        "steps": len(losses),
        "losses": losses,
        "loss_curve": _curve(losses),
        "seconds": {
            "stage1": stage1_seconds,
            "train": train_seconds,
            "per_step": train_seconds / max(1, len(losses)),
            "total": time.perf_counter() - started,
        },
        "device": str(session.adapter.device),
        "processes": accelerator.num_processes,
        "versions": _versions(session),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        import json

        accelerator.unwrap_model(model).save_pretrained(cfg.out)
        (Path(cfg.out) / "training.json").write_text(json.dumps(record, indent=1))
    return record


def _curve(losses: list[float], points: int = 20) -> list[float]:
    chunk = max(1, math.ceil(len(losses) / points))
    return [float(np.mean(losses[i : i + chunk])) for i in range(0, len(losses), chunk)]


def _versions(session: Session) -> dict[str, str | None]:
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    info = session.plugins.info("template", session.cfg.template)
    names = ["torch", "diffusers", "transformers", "accelerate", "diffusion-templates", "dt-sdk"]
    out = {name: version(name) for name in names}
    if info is not None and info.distribution:
        out[info.distribution] = info.version or version(info.distribution)
    return out
