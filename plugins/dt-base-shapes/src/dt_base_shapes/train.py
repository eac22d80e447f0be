"""Training: the VAE on images, then the transformer with flow matching on cached latents.

``dt-base-shapes train --out FOLDER`` runs :func:`train` with the default :class:`TrainConfig` and
writes a standard diffusers folder (``model_index.json``, one subfolder per component, safetensors)
that ``Flux2KleinPipeline.from_pretrained(FOLDER)`` loads with no custom code, plus
``training.json`` (the config, the losses, the wall times).

The objective is exactly what ``Flux2KleinPipeline.__call__`` integrates at inference:

- latents: ``vae.encode(image).latent_dist.mode()`` (the pipeline's ``_encode_vae_image``), 2x2-patched
  (``_patchify_latents``), normalised with the VAE's ``bn`` running statistics (set here from the
  data set's latents), packed to tokens (``_pack_latents``) with ``_prepare_latent_ids`` positions;
- text: ``_get_qwen3_prompt_embeds`` with ``text_encoder_out_layers`` and ``max_sequence_length``,
  ``_prepare_text_ids`` positions; the empty caption (the pipeline's CFG negative) for ~10% of samples;
- flow matching: ``x_t = (1 - t) x0 + t noise``, target ``v = noise - x0``; the transformer gets ``t``
  in [0, 1] (the pipeline passes ``scheduler_timestep / 1000 = sigma``), and the Euler scheduler
  steps ``x += (sigma_next - sigma) v``.

Everything is seeded: one command, one thread count, the same weights.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import Flux2KleinPipeline

from . import __version__
from .data import ShapesDataset
from .models import (
    MAX_SEQUENCE_LENGTH,
    TEXT_ENCODER_OUT_LAYERS,
    make_scheduler,
    make_text_encoder,
    make_tokenizer,
    make_transformer,
    make_vae,
    n_params,
)

P = Flux2KleinPipeline  # its static helpers define the latent and text conventions


@dataclass
class TrainConfig:
    seed: int = 0
    threads: int = 1  # one thread is much faster than two on a shared 2-core machine
    device: str = "cpu"  # random numbers are drawn on the CPU whatever the device
    n_images: int = 12000
    vae_steps: int = 2500
    vae_batch: int = 32
    vae_crop: int = 32  # the VAE is convolutional: random 32x32 crops train it 4x cheaper per sample ...
    vae_full_steps: int = 125  # ... and its last steps run on whole 64x64 images (GroupNorm statistics)
    vae_lr: float = 2e-3
    kl_weight: float = 1e-4
    steps: int = 5000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    ema: float = 0.999
    caption_dropout: float = 0.1
    vae_overrides: dict[str, Any] = field(default_factory=dict)
    transformer_overrides: dict[str, Any] = field(default_factory=dict)
    log_every: int = 100
    checkpoint_every: int = 250  # resumable: a killed run picks up from ``<out>.ckpt/`` (0: off)


def _lr(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1] (what the pipeline's image processor makes)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(images: torch.Tensor, cfg: TrainConfig, log=print) -> tuple[Any, list[float]]:
    vae = make_vae(cfg.seed, **cfg.vae_overrides).to(cfg.device).train()
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for step in range(cfg.vae_steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.vae_steps, cfg.warmup // 2, cfg.vae_lr)
        x = images[torch.randint(len(images), (cfg.vae_batch,), generator=gen)].to(cfg.device)
        if cfg.vae_crop and step < cfg.vae_steps - cfg.vae_full_steps:
            # crops aligned to the 8-pixel grid of the 2x2-patched latents
            i, j = (torch.randint(0, (x.shape[-1] - cfg.vae_crop) // 8 + 1, (2,), generator=gen) * 8).tolist()
            x = x[:, :, i : i + cfg.vae_crop, j : j + cfg.vae_crop]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(cfg.device)
        y = vae.decode(z).sample
        kl = 0.5 * (post.mean**2 + post.var - 1.0 - post.logvar).mean()
        loss = F.l1_loss(y, x) + F.mse_loss(y, x) + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            log(f"vae {step + 1}/{cfg.vae_steps} loss {np.mean(losses[-cfg.log_every :]):.4f}")
    return vae.cpu().eval(), losses


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Patchified (N, 4C, h/2, w/2) latents, as the pipeline makes them (mode of the posterior)."""
    out = [
        P._patchify_latents(vae.encode(images[i : i + batch]).latent_dist.mode())
        for i in range(0, len(images), batch)
    ]
    return torch.cat(out)


def set_latent_stats(vae, latents: torch.Tensor) -> None:
    """The VAE's ``bn`` running statistics: what the pipeline uses to (un)normalise latents."""
    vae.bn.running_mean.copy_(latents.mean(dim=(0, 2, 3)))
    vae.bn.running_var.copy_(latents.var(dim=(0, 2, 3)))


def normalize_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return (latents - mean) / std


@torch.no_grad()
def prompt_embeds(text_encoder, tokenizer, captions: list[str], batch: int = 256) -> torch.Tensor:
    out = [
        P._get_qwen3_prompt_embeds(
            text_encoder,
            tokenizer,
            captions[i : i + batch],
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            hidden_states_layers=TEXT_ENCODER_OUT_LAYERS,
        )
        for i in range(0, len(captions), batch)
    ]
    return torch.cat(out)


def sample_t(n: int, gen: torch.Generator) -> torch.Tensor:
    """Half logit-normal(0, 1), half uniform: every sigma the sampler visits is trained."""
    logit = torch.sigmoid(torch.randn(n, generator=gen))
    uniform = torch.rand(n, generator=gen)
    pick = torch.rand(n, generator=gen) < 0.5
    return torch.where(pick, logit, uniform).clamp(1e-4, 1.0)


def flow_matching_loss(transformer, x0, text, t, noise, img_ids, txt_ids) -> torch.Tensor:
    """MSE between the predicted and the true velocity ``noise - x0`` at ``x_t = (1 - t) x0 + t noise``."""
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    pred = transformer(
        hidden_states=xt,
        encoder_hidden_states=text,
        timestep=t,  # the pipeline passes scheduler timestep / 1000 = sigma
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=None,
        return_dict=False,
    )[0]
    return F.mse_loss(pred, noise - x0)


def train_transformer(
    latents: torch.Tensor,
    caption_ids: torch.Tensor,
    embeds: torch.Tensor,
    empty: torch.Tensor,
    cfg: TrainConfig,
    log=print,
    checkpoint: Path | None = None,
) -> tuple[Any, list[float]]:
    """``latents`` (N, 4C, h, w) normalised; ``embeds[caption_ids[i]]`` is sample i's prompt embedding.

    With ``checkpoint``, the state is saved there every ``cfg.checkpoint_every`` steps and a run
    resumes from it (bit-identically: every random number comes from one saved generator).
    """
    transformer = make_transformer(cfg.seed, **cfg.transformer_overrides).to(cfg.device).train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    tokens = P._pack_latents(latents)  # (N, h*w, 4C)
    dev = cfg.device
    img_ids = P._prepare_latent_ids(latents[:1]).expand(cfg.batch, -1, -1).to(dev)
    txt_ids = P._prepare_text_ids(embeds[:1]).expand(cfg.batch, -1, -1).to(dev)
    tokens, embeds, empty = tokens.to(dev), embeds.to(dev), empty.to(dev)
    losses: list[float] = []
    start = 0
    if checkpoint is not None and checkpoint.exists():
        # weights_only: the restricted unpickler (tensors and plain containers, never code), so a
        # planted or corrupted resume file cannot run anything; everything saved here is of those types.
        state = torch.load(checkpoint, weights_only=True)
        if state["config"] == asdict(cfg):
            transformer.load_state_dict(state["transformer"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            losses, start = state["losses"], state["step"]
            log(f"transformer: resumed at step {start} from {checkpoint}")
    for step in range(start, cfg.steps):
        if (
            checkpoint is not None
            and cfg.checkpoint_every
            and step > start
            and step % cfg.checkpoint_every == 0
        ):
            _save_atomic(
                {
                    "config": asdict(cfg),
                    "transformer": transformer.state_dict(),
                    "ema": ema.state_dict(),
                    "opt": opt.state_dict(),
                    "gen": gen.get_state(),
                    "losses": losses,
                    "step": step,
                },
                checkpoint,
            )
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.steps, cfg.warmup, cfg.lr)
        idx = torch.randint(len(tokens), (cfg.batch,), generator=gen)
        text = embeds[caption_ids[idx].to(dev)]
        drop = (torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout).to(dev)
        text = torch.where(drop[:, None, None], empty.expand_as(text), text)
        x0 = tokens[idx.to(dev)]
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        t = sample_t(cfg.batch, gen).to(dev)
        loss = flow_matching_loss(transformer, x0, text, t, noise, img_ids, txt_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), transformer.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            log(f"transformer {step + 1}/{cfg.steps} loss {np.mean(losses[-cfg.log_every :]):.4f}")
    return ema.cpu(), losses


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _curve(losses: list[float], points: int = 20) -> list[float]:
    """The loss curve as ``points`` chunk means."""
    chunk = max(1, math.ceil(len(losses) / points))
    return [float(np.mean(losses[i : i + chunk])) for i in range(0, len(losses), chunk)]


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def train(out: str | Path, cfg: TrainConfig | None = None, log=print) -> dict[str, Any]:
    """Train everything and save the pipeline folder to ``out``; returns the training record."""
    cfg = cfg or TrainConfig()
    torch.set_num_threads(cfg.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    record: dict[str, Any] = {"version": __version__, "config": asdict(cfg), "torch": torch.__version__}

    t0 = time.perf_counter()
    data = ShapesDataset(cfg.n_images, seed=cfg.seed, split="train")
    images_np, captions = data.arrays()
    images = to_tensor(images_np)
    record["data_seconds"] = time.perf_counter() - t0
    log(f"data: {len(images)} images in {record['data_seconds']:.1f} s")

    ckpt = Path(str(out) + ".ckpt") if cfg.checkpoint_every else None
    t0 = time.perf_counter()
    vae_ckpt = ckpt / "vae.pt" if ckpt else None
    state = torch.load(vae_ckpt, weights_only=True) if vae_ckpt and vae_ckpt.exists() else None
    if state is not None and state["config"] == asdict(cfg):
        vae = make_vae(cfg.seed, **cfg.vae_overrides)
        vae.load_state_dict(state["vae"])
        vae, vae_losses = vae.eval(), state["losses"]
        record["vae_seconds"] = state["seconds"]
        log(f"vae: loaded from {vae_ckpt}")
    else:
        vae, vae_losses = train_vae(images, cfg, log)
        record["vae_seconds"] = time.perf_counter() - t0
        if vae_ckpt is not None:
            state = {"config": asdict(cfg), "vae": vae.state_dict(), "losses": vae_losses}
            _save_atomic({**state, "seconds": record["vae_seconds"]}, vae_ckpt)

    t0 = time.perf_counter()
    latents = encode_latents(vae, images)
    set_latent_stats(vae, latents)
    latents = normalize_latents(vae, latents)
    tokenizer, text_encoder = make_tokenizer(), make_text_encoder(cfg.seed)
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    caption_ids = torch.tensor([index[c] for c in captions])
    embeds = prompt_embeds(text_encoder, tokenizer, unique)
    empty = prompt_embeds(text_encoder, tokenizer, [""])
    record["cache_seconds"] = time.perf_counter() - t0
    log(f"cached {len(latents)} latents {tuple(latents.shape[1:])} and {len(unique)} captions")

    t0 = time.perf_counter()
    transformer, tr_losses = train_transformer(
        latents, caption_ids, embeds, empty, cfg, log, checkpoint=ckpt / "transformer.pt" if ckpt else None
    )
    record["transformer_seconds"] = time.perf_counter() - t0

    pipe = Flux2KleinPipeline(
        scheduler=make_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=False,
    )
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    record["total_seconds"] = time.perf_counter() - started
    record["cpu_seconds"] = time.process_time() - cpu_started
    record["params"] = {
        "vae": n_params(vae),
        "transformer": n_params(transformer),
        "text_encoder": n_params(text_encoder),
    }
    record["vae_loss_last100"] = float(np.mean(vae_losses[-100:]))
    record["transformer_loss_last100"] = float(np.mean(tr_losses[-100:]))
    record["vae_losses"] = _curve(vae_losses)
    record["transformer_losses"] = _curve(tr_losses)
    record["folder_bytes"] = folder_size(out)
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    if ckpt is not None:
        shutil.rmtree(ckpt, ignore_errors=True)
    log(f"saved {out} ({record['folder_bytes'] / 1e6:.1f} MB) in {record['total_seconds']:.0f} s")
    return record
