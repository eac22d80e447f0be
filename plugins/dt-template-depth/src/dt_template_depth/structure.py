"""``structure-kv``: a trained structure template, a silhouette mask -> one K/V token per image token.

The paper's structure control is a ControlNet-like model for FLUX.2-klein; FLUX.2 takes no ControlNet
residuals (``depth`` is refused there), so this template speaks to the model through the ``kv`` carrier::

    mask (1, 1, H, W) -> resized to 8 x the latent token grid -> 3 stride-2 convs -> (B, hidden, h, w)
        -> one token per latent grid cell -> one Linear per attention layer -> keys, values
        keys rotated with the RoPE of the image token at that cell (FLUX.2's own position ids)

The ``kv`` carrier appends extra K/V after RoPE without positions; emitting keys that are already
rotated like the image tokens' gives each extra token the position of its grid cell, so an image
token attends to the mask cells around it as it would to its neighbours. The rotary tables come from
the pipeline's transformer (``pos_embed`` of the ids ``Flux2KleinPipeline._prepare_latent_ids``
gives) in ``process_inputs``; ``forward`` applies them. Value projections start at zero.

The mask has the size of the image to generate (height x width of the call): it sets the latent grid.
Weights ship in ``weights/<name>/`` (``shapes``: trained on the ``dt-base-shapes`` demo model, see
``dt_template_depth.shapes``) or come from a local folder saved with ``save_pretrained``; the
attention layout they fit is in their config and checked before anything runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from pydantic import Field, field_validator
from torch import nn

from diffusion_templates import EncodeContext, TemplateInputs
from diffusion_templates.pictures import to_mask
from diffusion_templates.trained import (
    KVTemplateModel,
    TrainedKVTemplate,
    kv_projections,
    module_key,
    resolve_weights,
)
from diffusion_templates.trained import shipped_weights as _shipped_weights

#: Shipped weights: ``weights/<name>/`` next to this module.
WEIGHTS = Path(__file__).parent / "weights"
#: The conv encoder halves the mask three times: it sees 8 x 8 pixels per latent grid cell.
CELL = 8


def shipped_weights() -> list[str]:
    """Names of the weights that ship with the package."""
    return _shipped_weights(WEIGHTS)


def token_grid(context: EncodeContext | None, height: int, width: int) -> tuple[int, int]:
    """The packed latent token grid of a ``height`` x ``width`` FLUX.2 image (8x8: 64 px, demo model)."""
    factor = 2 * int(getattr(context.pipe, "vae_scale_factor", 8)) if context is not None else 16
    return max(1, height // factor), max(1, width // factor)


@torch.no_grad()
def image_rope(
    context: EncodeContext | None, grid: tuple[int, int], head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (grid cells, head_dim) of the image tokens' RoPE, as the FLUX.2 transformer computes them.

    Ids as ``Flux2KleinPipeline._prepare_latent_ids``: (t=0, row, column, layer=0), rows major.
    Identity (cos 1, sin 0) without a pipeline or when the transformer's rotary size differs.
    """
    h, w = grid
    transformer = getattr(getattr(context, "pipe", None), "transformer", None)
    pos_embed = getattr(transformer, "pos_embed", None)
    if pos_embed is not None and sum(getattr(pos_embed, "axes_dim", ())) == head_dim:
        ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
        cos, sin = pos_embed(ids.to(transformer.device))
        return cos.float().cpu(), sin.float().cpu()
    return torch.ones(h * w, head_dim), torch.zeros(h * w, head_dim)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FLUX's rotary embedding (diffusers' ``apply_rotary_emb``, interleaved pairs) on (B, L, heads, D)
    with cos/sin (B or 1, L, D)."""
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


class StructureKVModel(KVTemplateModel):
    """A silhouette mask (B, 1, 8h, 8w) -> per layer keys/values (B, h*w, heads, head_dim), keys RoPE'd."""

    @register_to_config
    def __init__(self, layers: dict[str, list[int]] | None = None, channels: int = 32, hidden_dim: int = 96):
        super().__init__()
        self.layers = {n: (int(h), int(d)) for n, (h, d) in dict(layers or {"double_0": [2, 16]}).items()}
        c = channels
        self.encoder = nn.Sequential(
            nn.Conv2d(2, c, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * c, hidden_dim, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1),
            nn.SiLU(),
        )
        self.to_k, self.to_v = kv_projections(self.layers, hidden_dim)

    @torch.no_grad()
    def process_inputs(self, inputs: Any, context: EncodeContext | None = None) -> dict[str, Any]:
        """The mask resized to 8 pixels per latent grid cell (area average), and the grid's RoPE tables."""
        mask = inputs.mask.float()
        grid = token_grid(context, mask.shape[-2], mask.shape[-1])
        mask = F.interpolate(mask, size=(grid[0] * CELL, grid[1] * CELL), mode="area")
        head_dim = next(iter(self.layers.values()))[1]
        cos, sin = image_rope(context, grid, head_dim)
        return {
            "mask": mask.to(self.device),
            "cos": cos[None].to(self.device),
            "sin": sin[None].to(self.device),
        }

    def forward(
        self, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> dict[str, dict[str, torch.Tensor]]:
        dtype = self.to_k[module_key(next(iter(self.layers)))].weight.dtype
        mask = mask.to(dtype)
        # Second channel: ones, so that the zero padding tells the encoder where the image ends.
        h = self.encoder(torch.cat([mask * 2 - 1, torch.ones_like(mask)], dim=1))  # (B, hidden, gh, gw)
        batch = h.shape[0]
        tokens = h.flatten(2).transpose(1, 2)  # (B, gh*gw, hidden), rows major as the image ids
        keys, values = {}, {}
        for name, (heads, head_dim) in self.layers.items():
            k = self.to_k[module_key(name)](tokens).view(batch, -1, heads, head_dim)
            if k.shape[-1] == cos.shape[-1]:
                k = rotate(k, cos.to(k.dtype), sin.to(k.dtype))
            keys[name] = k
            values[name] = self.to_v[module_key(name)](tokens).view(batch, -1, heads, head_dim)
        return {"keys": keys, "values": values}


class StructureKVInputs(TemplateInputs):
    mask: Any = Field(
        description=(
            "Silhouette of the object to draw, the size of the image to generate: white (1) = object, black "
            "(0) = background; a PIL image (mode L, 1 or RGB), a file path, a numpy array (H, W) (bool, "
            "uint8, or float in [0, 1]) or a tensor. Soft values are kept (area-averaged to 8 pixels per "
            "latent grid cell)."
        ),
    )
    weights: str = Field(
        "shapes",
        description=(
            "Trained weights: a name shipped with the package ('shapes': the dt-base-shapes demo model) or a "
            "local folder saved with save_pretrained. They must match the pipeline's attention layout."
        ),
    )

    @field_validator("mask", mode="plain")
    @classmethod
    def _mask(cls, value: Any) -> Any:
        return to_mask(value, what="mask")

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        resolve_weights(value, WEIGHTS)
        return value


def demo_inputs(base_image: Any) -> dict[str, Any]:
    """For ``dt demo``: a disc in the top-left quarter of an image the base image's size."""
    import numpy as np

    width, height = base_image.size
    yy, xx = np.mgrid[0:height, 0:width]
    r = min(width, height) / 6
    return {"mask": ((xx - width * 0.3) ** 2 + (yy - height * 0.3) ** 2 <= r * r).astype(np.float32)}


#: The shapes model's colour words (its captions name the shape's colour before the shape).
SHAPES_COLOURS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple")


def demo_prompt(prompt: str) -> str:
    """For ``dt demo``: the caption without size, shape and position ("a red shape on a ... background"),
    which the mask now decides."""
    subject, sep, background = prompt.partition(" on ")
    colours = [w for w in subject.split() if w in SHAPES_COLOURS]
    return f"a {colours[0]} shape{sep}{background}" if colours else f"a shape{sep}{background}"


class StructureKVTemplate(TrainedKVTemplate):
    """Draws the object in the silhouette ``mask`` through learned, positioned extra attention tokens."""

    Inputs = StructureKVInputs
    Model = StructureKVModel
    demo_inputs = staticmethod(demo_inputs)
    demo_prompt = staticmethod(demo_prompt)
    # Keep in sync with the dt-carrier:kv@structure-kv / dt-backbone:flux2@structure-kv keywords.
    carriers = ("kv",)
    backbones = ("flux2",)
    weights_dir = WEIGHTS
