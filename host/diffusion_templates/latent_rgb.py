"""A linear latent -> RGB map per pipeline, fitted from the pipeline's own VAE.

The map takes a latent *grid* (B, C, h, w) in the space the scheduler steps in (the denoiser's
latents after the backbone adapter's ``unpack_latents``: VAE scaling/shift, FLUX.2's batch-norm and
2x2 patchify, Qwen-Image's ``latents_mean``/``latents_std`` all applied) to the mean RGB in [0, 1] of
the image patch each latent cell covers. It is an affine map, ``rgb = M @ z + b`` per cell, with
``M`` of shape (3, C).

Fitting needs no per-family constants: a fixed, deterministic set of synthetic images (flat
colours, gradients, checkerboards, stripes, blocks, smooth noise) is encoded with the adapter's
``encode_images`` (the pipeline's VAE and normalisation, distribution mode, no sampling), and
``(M, b)`` solves a least-squares problem from every cell's latent vector to the mean colour of its
pixel patch. A second, disjoint set of random flat colours and gradients gives a held-out R^2.

Maps are cached per VAE module (a ``WeakKeyDictionary``; the key also holds the adapter and the
VAE's config), so each is fitted once per process. If a VAE's weights are replaced in place, call
:func:`clear_latent_rgb_cache`.

For guidance the map also gives the reverse direction: :meth:`LatentRGBMap.pullback` (the
gradient through the map, ``M^T g``) and :meth:`LatentRGBMap.inverse` (the minimum-norm latent
change producing an RGB change, ``pinv(M) d``).
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .errors import UnsupportedError

if TYPE_CHECKING:
    from .backbones.base import BackboneAdapter

__all__ = [
    "LatentRGBMap",
    "clear_latent_rgb_cache",
    "fit_latent_rgb_map",
    "heldout_images",
    "latent_rgb_map",
    "r_squared",
    "synthetic_images",
]

logger = logging.getLogger(__name__)

_ENCODE_PIXELS = 1 << 20  # pixels per VAE encode call while fitting (64 images of 128 x 128)


@dataclass(frozen=True, eq=False)
class LatentRGBMap:
    """``rgb = matrix @ z + bias`` per latent cell; RGB in [0, 1], one value per ``cell`` x ``cell`` patch."""

    matrix: torch.Tensor  # (3, C), float32
    bias: torch.Tensor  # (3,), float32
    cell: int  # pixels per latent cell side
    r2: float  # on held-out images (random flat colours and gradients)
    r2_fit: float  # on the fitting images
    source: str = ""  # which adapter / VAE it was fitted for
    pinv: torch.Tensor = field(init=False, repr=False)  # (C, 3) Moore-Penrose pseudo-inverse of ``matrix``

    def __post_init__(self) -> None:
        pinv = torch.linalg.pinv(self.matrix.double()).to(self.matrix.device, torch.float32)
        object.__setattr__(self, "pinv", pinv)

    @property
    def channels(self) -> int:
        return self.matrix.shape[1]

    def to(self, device: torch.device | str | None = None) -> LatentRGBMap:
        """A copy with its tensors on ``device`` (they stay float32)."""
        return LatentRGBMap(
            self.matrix.to(device), self.bias.to(device), self.cell, self.r2, self.r2_fit, self.source
        )

    def _check(self, latents: torch.Tensor) -> None:
        if latents.ndim != 4 or latents.shape[1] != self.channels:
            raise ValueError(
                f"latent -> RGB map ({self.source}) expects a grid (B, {self.channels}, h, w), "
                f"got {tuple(latents.shape)}"
            )

    def to_rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """Latent grid (B, C, h, w) -> RGB estimate (B, 3, h, w), differentiable, in float32."""
        self._check(latents)
        matrix = self.matrix.to(latents.device)
        bias = self.bias.to(latents.device)
        return torch.einsum("oc,bchw->bohw", matrix, latents.float()) + bias.view(1, 3, 1, 1)

    def pullback(self, grad_rgb: torch.Tensor) -> torch.Tensor:
        """Gradient through the map: ``M^T g`` per cell, (B, 3, h, w) -> (B, C, h, w)."""
        return torch.einsum("oc,bohw->bchw", self.matrix.to(grad_rgb.device), grad_rgb.float())

    def inverse(self, rgb_delta: torch.Tensor) -> torch.Tensor:
        """The minimum-norm latent change whose RGB change is ``rgb_delta``: (B, 3, h, w) -> (B, C, h, w)."""
        return torch.einsum("co,bohw->bchw", self.pinv.to(rgb_delta.device), rgb_delta.float())


# --------------------------------------------------------------------------- synthetic images


def _colours(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, 3, generator=generator, dtype=torch.float64)


def _lerp_image(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-pixel blend ``a + t (b - a)``; ``a``, ``b`` (3,), ``t`` (H, W) -> (3, H, W)."""
    return a.view(3, 1, 1) + t.unsqueeze(0) * (b - a).view(3, 1, 1)


def synthetic_images(size: int, *, seed: int = 0) -> torch.Tensor:
    """The fitting set: (54, 3, size, size) float64 in [0, 1], deterministic for a given ``seed``.

    40 flat colours (the 27 corners and mid-points of the RGB cube and 13 random ones), 6 gradients
    (horizontal, vertical, diagonal), checkerboards and stripes at two scales, random blocks, and smooth
    random noise.
    """
    g = torch.Generator().manual_seed(seed)
    images = []
    levels = (0.0, 0.5, 1.0)
    cube = torch.tensor([(r, gr, b) for r in levels for gr in levels for b in levels], dtype=torch.float64)
    for colour in torch.cat([cube, _colours(13, g)]):
        images.append(colour.view(3, 1, 1).expand(3, size, size))
    ramp = torch.linspace(0, 1, size, dtype=torch.float64)
    ramps = (ramp.view(1, -1).expand(size, size), ramp.view(-1, 1).expand(size, size))
    ramps += ((ramps[0] + ramps[1]) / 2,)
    for i in range(6):
        a, b = _colours(2, g)
        images.append(_lerp_image(a, b, ramps[i % 3]))
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for period in (1, 4):
        a, b = _colours(2, g)
        images.append(_lerp_image(a, b, (((yy // period) + (xx // period)) % 2).double()))
        a, b = _colours(2, g)
        images.append(_lerp_image(a, b, ((xx // period) % 2).double()))
    for block in (4, 16):
        cells = -(-size // block)
        grid = torch.rand(3, cells, cells, generator=g, dtype=torch.float64)
        images.append(grid.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :size, :size])
    for coarse in (2, 6):
        noise = torch.rand(1, 3, coarse, coarse, generator=g, dtype=torch.float64)
        images.append(F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)[0])
    return torch.stack([im.contiguous() for im in images]).clamp(0, 1)


def heldout_images(size: int, *, seed: int = 1) -> torch.Tensor:
    """Held-out set: 16 random flat colours and 8 random two-colour gradients, disjoint from the fit."""
    g = torch.Generator().manual_seed(10_000 + seed)
    images = [c.view(3, 1, 1).expand(3, size, size) for c in _colours(16, g)]
    ramp = torch.linspace(0, 1, size, dtype=torch.float64)
    for i in range(8):
        a, b = _colours(2, g)
        t = ramp.view(1, -1).expand(size, size) if i % 2 == 0 else ramp.view(-1, 1).expand(size, size)
        images.append(_lerp_image(a, b, t))
    return torch.stack([im.contiguous() for im in images])


# --------------------------------------------------------------------------- fitting


@contextmanager
def _reading_only(module: object):
    """Drop the instance attributes a forward adds to ``module``'s submodules, so that fitting only reads
    the VAE (Qwen-Image's VAE creates its conv caches, ``_feat_map`` and friends, on its first encode)."""
    modules = list(module.modules()) if isinstance(module, torch.nn.Module) else []
    before = [(m, set(m.__dict__)) for m in modules]
    try:
        yield
    finally:
        for m, keys in before:
            for key in set(m.__dict__) - keys:
                del m.__dict__[key]


@torch.no_grad()
def _encode(adapter: BackboneAdapter, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> latent grids (float64, CPU), through the adapter in chunks."""
    chunks = []
    step = max(1, _ENCODE_PIXELS // (images.shape[-2] * images.shape[-1]))
    with _reading_only(getattr(getattr(adapter, "pipe", None), "vae", None)):
        for start in range(0, images.shape[0], step):
            batch = images[start : start + step].float() * 2 - 1
            grid = adapter.encode_images(batch)
            if grid.ndim != 4:
                raise RuntimeError(
                    f"{adapter.name}: encode_images returned shape {tuple(grid.shape)}, not (B, C, h, w)"
                )
            chunks.append(grid.detach().to("cpu", torch.float64))
    grids = torch.cat(chunks)
    if not torch.isfinite(grids).all():
        raise RuntimeError(
            f"{adapter.name}: the VAE produced non-finite latents while fitting the latent -> RGB map "
            f"(VAE dtype {adapter.pipe.vae.dtype}); fp16 VAEs that need upcasting are not supported"
        )
    return grids


def _cells(grids: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Latent cells (n, C) and the mean colour of their pixel patches (n, 3)."""
    h, w = grids.shape[-2:]
    if images.shape[-2] % h or images.shape[-1] % w or images.shape[-2] // h != images.shape[-1] // w:
        raise RuntimeError(f"latent grid {h}x{w} does not tile the {tuple(images.shape[-2:])} images")
    cell = images.shape[-2] // h
    targets = F.avg_pool2d(images, cell)
    x = grids.permute(0, 2, 3, 1).reshape(-1, grids.shape[1])
    y = targets.permute(0, 2, 3, 1).reshape(-1, 3)
    return x, y, cell


def r_squared(predicted: torch.Tensor, actual: torch.Tensor) -> float:
    """Coefficient of determination over all rows and channels (each channel about its own mean)."""
    predicted, actual = predicted.double(), actual.double()
    residual = (actual - predicted).square().sum()
    total = (actual - actual.mean(dim=0, keepdim=True)).square().sum()
    return float(1 - residual / total)


def _fit_size(adapter: BackboneAdapter) -> int:
    """Image side for fitting: 8 latent cells across (a probe encode finds the cell size)."""
    probe = _encode(adapter, torch.full((1, 3, 64, 64), 0.5, dtype=torch.float64))
    cell = 64 // probe.shape[-1]
    return max(64, 8 * cell)


def fit_latent_rgb_map(adapter: BackboneAdapter, *, seed: int = 0) -> LatentRGBMap:
    """Fit a fresh map for ``adapter``'s pipeline (no caching; see :func:`latent_rgb_map`)."""
    if not callable(getattr(adapter, "encode_images", None)):
        raise UnsupportedError(
            f"backbone {adapter.name!r} has no encode_images method: no latent -> RGB map can be fitted"
        )
    size = _fit_size(adapter)
    images = synthetic_images(size, seed=seed)
    x, y, cell = _cells(_encode(adapter, images), images)
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    gram = design.T @ design
    ridge = 1e-8 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    ridge[-1, -1] = 0  # no penalty on the bias
    solution = torch.linalg.solve(gram + ridge, design.T @ y)  # (C + 1, 3)
    matrix, bias = solution[:-1].T.contiguous(), solution[-1].contiguous()
    r2_fit = r_squared(design @ solution, y)
    held = heldout_images(size, seed=seed + 1)
    hx, hy, _ = _cells(_encode(adapter, held), held)
    r2 = r_squared(hx @ matrix.T + bias, hy)
    source = f"{adapter.name}:{type(adapter.pipe.vae).__name__}"
    rgb_map = LatentRGBMap(matrix.float(), bias.float(), cell, r2, r2_fit, source)
    if r2 < 0.5:
        logger.warning(
            "latent -> RGB map for %s: held-out R^2 %.4f (fit %.4f); the VAE's latents are far from "
            "linear in colour, so statistics measured through the map are approximate",
            source,
            r2,
            r2_fit,
        )
    else:
        logger.info("latent -> RGB map for %s: held-out R^2 %.4f (fit %.4f)", source, r2, r2_fit)
    return rgb_map


_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, str], LatentRGBMap]] = (
    weakref.WeakKeyDictionary()
)
_LOCK = threading.Lock()


def _config_key(vae: torch.nn.Module) -> str:
    config = getattr(vae, "config", None)
    try:
        return json.dumps(dict(config or {}), sort_keys=True, default=str)
    except TypeError:
        return repr(config)


def latent_rgb_map(adapter: BackboneAdapter) -> LatentRGBMap:
    """The map of ``adapter``'s pipeline, fitted on first use and cached per VAE module."""
    vae = getattr(adapter.pipe, "vae", None)
    if not isinstance(vae, torch.nn.Module):
        raise UnsupportedError(
            f"backbone {adapter.name!r}: the pipeline has no VAE to fit a latent -> RGB map"
        )
    key = (adapter.name, _config_key(vae))
    with _LOCK:
        per_vae = _CACHE.setdefault(vae, {})
        if key not in per_vae:
            per_vae[key] = fit_latent_rgb_map(adapter)
        return per_vae[key]


def clear_latent_rgb_cache() -> None:
    """Forget every fitted map (e.g. after loading new VAE weights in place)."""
    with _LOCK:
        _CACHE.clear()
