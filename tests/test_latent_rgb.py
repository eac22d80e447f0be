"""The linear latent -> RGB map: fitting, held-out R^2, caching, and the adapters' latent layouts."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from diffusion_templates import TemplatePipeline
from diffusion_templates.latent_rgb import (
    fit_latent_rgb_map,
    heldout_images,
    latent_rgb_map,
    r_squared,
    synthetic_images,
)
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from diffusion_templates.testing.tiny import TINY_PIPELINES, tiny_call_kwargs

FAMILIES = ["flux2_klein", "flux", "sd3", "qwen_image", "sdxl"]
SESSION_FIXTURES = {"flux2_klein": "flux2_pipe", "flux": "flux_pipe"}


@functools.cache
def _built(family: str):
    pipe = TINY_PIPELINES[family].build()
    pipe(prompt="warm up", **tiny_call_kwargs(family, cfg=True))
    return pipe


def tiny_pipe(request, family: str):
    """The shared session pipeline where conftest has one, else one built once per process."""
    if family in SESSION_FIXTURES:
        return request.getfixturevalue(SESSION_FIXTURES[family])
    return _built(family)


# --------------------------------------------------------------------------- fitting, exactly


class _LinearEncoder:
    """A stand-in adapter whose 'VAE' is exactly affine per 8x8 patch: z = W (2 rgb - 1) + c."""

    name = "linear-test"

    def __init__(self, channels: int = 6, cell: int = 8, gamma: float = 1.0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(channels, 3, generator=g)
        self.offset = torch.randn(channels, generator=g)
        self.cell, self.gamma = cell, gamma
        self.pipe = SimpleNamespace(vae=SimpleNamespace(dtype=torch.float32))

    def encode_images(self, images):
        rgb = ((images + 1) / 2).clamp(0, 1) ** self.gamma
        pooled = F.avg_pool2d(rgb, self.cell)
        return torch.einsum("cr,brhw->bchw", self.weight, 2 * pooled - 1) + self.offset.view(1, -1, 1, 1)


def test_fit_recovers_an_exactly_linear_encoder():
    encoder = _LinearEncoder()
    rgb_map = fit_latent_rgb_map(encoder)
    assert rgb_map.matrix.shape == (3, 6) and rgb_map.cell == 8
    assert rgb_map.r2 > 0.99999 and rgb_map.r2_fit > 0.99999
    # rgb = M z + b inverts z = W (2 rgb - 1) + c on the 3-D image of the encoder.
    assert torch.allclose(rgb_map.matrix @ (2 * encoder.weight), torch.eye(3), atol=1e-4)
    colours = torch.rand(5, 3, 1, 1, generator=torch.Generator().manual_seed(3))
    z = encoder.encode_images(colours.expand(5, 3, 16, 16) * 2 - 1)
    assert torch.allclose(rgb_map.to_rgb(z), colours.expand(5, 3, 2, 2), atol=1e-4)


def test_held_out_r2_measures_a_nonlinear_encoder():
    rgb_map = fit_latent_rgb_map(_LinearEncoder(gamma=2.2))
    print(f"\nR^2 held-out for a gamma-2.2 encoder: {rgb_map.r2:.4f} (fit {rgb_map.r2_fit:.4f})")
    assert 0.8 < rgb_map.r2 < 0.999


def test_inverse_and_pullback_directions():
    rgb_map = fit_latent_rgb_map(_LinearEncoder(channels=5))
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 5, 3, 4, generator=g)
    d_rgb = torch.randn(2, 3, 3, 4, generator=g)
    # inverse: the minimum-norm latent change with exactly this RGB change
    dz = rgb_map.inverse(d_rgb)
    assert torch.allclose(rgb_map.to_rgb(z + dz) - rgb_map.to_rgb(z), d_rgb, atol=1e-4)
    # pullback: the gradient through the map
    zr = z.clone().requires_grad_(True)
    (rgb_map.to_rgb(zr) * d_rgb).sum().backward()
    assert torch.allclose(rgb_map.pullback(d_rgb), zr.grad, atol=1e-6)


def test_synthetic_images_are_deterministic_and_in_range():
    a, b = synthetic_images(32), synthetic_images(32)
    assert torch.equal(a, b) and a.shape == (54, 3, 32, 32)
    assert a.min() >= 0 and a.max() <= 1
    held = heldout_images(32)
    assert not any(torch.equal(h, x) for h in held for x in a)


# --------------------------------------------------------------------------- the tiny pipelines


def _loop_latents(pipe, adapter, family: str, size: int = 64) -> torch.Tensor:
    """Random latents in the layout the denoising loop carries (captured from a real call)."""
    seen = {}

    def grab(_pipe, step, timestep, tensors):
        seen["latents"] = tensors["latents"]
        return {}

    kwargs = tiny_call_kwargs(family, steps=1, size=size, output_type="latent")
    pipe(prompt="x", callback_on_step_end=grab, **kwargs)
    return seen["latents"]


@pytest.mark.parametrize("family", FAMILIES)
def test_map_per_family_fitted_once_on_the_pipeline_vae(family, request):
    pipe = tiny_pipe(request, family)
    before = pipeline_state(pipe)
    adapter = TemplatePipeline(pipe).adapter
    rgb_map = latent_rgb_map(adapter)
    assert latent_rgb_map(TemplatePipeline(pipe).adapter) is rgb_map  # cached per VAE
    assert_pipeline_unchanged(before, pipe)

    # The map reads the grid the scheduler steps in: same channels and cell as unpacked loop latents.
    loop = _loop_latents(pipe, adapter, family)
    grid = adapter.unpack_latents(loop, 64, 64)
    assert grid.shape[1] == rgb_map.channels and 64 // grid.shape[-1] == rgb_map.cell
    assert torch.equal(adapter.repack_latents(grid, 64, 64), loop)
    encoded = adapter.encode_images(torch.zeros(1, 3, 64, 64))
    assert encoded.shape[1:] == grid.shape[1:]

    # R^2 on held-out colours (not those of the fit): random flat colours and a few gradients.
    held = heldout_images(64, seed=7)
    with torch.no_grad():
        z = adapter.encode_images(held.float() * 2 - 1).double()
    predicted = rgb_map.to_rgb(z.float()).double()
    actual = F.avg_pool2d(held, rgb_map.cell)
    r2 = r_squared(predicted.permute(0, 2, 3, 1).reshape(-1, 3), actual.permute(0, 2, 3, 1).reshape(-1, 3))
    print(
        f"\n{family}: latent->RGB R^2 held-out {r2:.4f} (map's own held-out {rgb_map.r2:.4f}, fit "
        f"{rgb_map.r2_fit:.4f}); tiny VAEs have random weights"
    )
    assert r2 <= 1 and torch.isfinite(torch.tensor(r2))
    assert torch.isfinite(rgb_map.matrix).all() and torch.isfinite(rgb_map.pinv).all()


def test_flux2_unpack_matches_the_pipeline_position_ids(flux2_pipe):
    adapter = TemplatePipeline(flux2_pipe).adapter
    loop = torch.randn(2, 4 * 6, 16, generator=torch.Generator().manual_seed(0))  # 64 x 96 picture
    ids = flux2_pipe._prepare_latent_ids(torch.zeros(2, 16, 4, 6))
    expected = flux2_pipe._unpack_latents_with_ids(loop, ids, 4, 6)
    assert torch.equal(adapter.unpack_latents(loop, 64, 96), expected)
    # reference-image tokens after the image's own are ignored
    extra = torch.cat([loop, torch.randn(2, 5, 16)], dim=1)
    assert torch.equal(adapter.unpack_latents(extra, 64, 96), expected)
