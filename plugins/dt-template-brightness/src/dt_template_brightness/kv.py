"""``brightness-kv``: the paper's brightness template, a trained value encoder emitting a kv cache.

The target mean luminance becomes a handful of extra attention tokens per attention layer::

    scale -> [scale, sin(k pi scale), cos(k pi scale)]_k -> MLP -> h          (B, hidden)
    h + learned token embeddings -> SiLU -> Linear -> SiLU                      (B, tokens, hidden)
        -> one Linear per attention layer -> keys, values                       (B, tokens, heads, head_dim)

The ``kv`` carrier appends them to every attention call of the conditional branch. The value
projections start at zero, so an untrained model only dilutes attention a little. Weights ship in
``weights/<name>/`` (``shapes``: trained on the ``dt-base-shapes`` demo model, see
``dt_template_brightness.shapes``); a local folder saved with ``save_pretrained`` works too. A
model only fits pipelines with its attention layout (layer names, heads, head_dim), which is kept
in its config and checked before anything runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusion_templates import EncodeContext, KVCache, Template, TemplateError, TemplateInputs, TemplateModel
from pydantic import Field, field_validator
from torch import nn

#: Shipped weights: ``weights/<name>/`` next to this module.
WEIGHTS = Path(__file__).parent / "weights"
#: Untrained models are initialised from this seed.
INIT_SEED = 0


def shipped_weights() -> list[str]:
    """Names of the weights that ship with the package."""
    if not WEIGHTS.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS.iterdir() if (p / "config.json").is_file())


def resolve_weights(value: str, shipped: Path = WEIGHTS) -> Path:
    """A shipped weights name or a local folder -> the folder (``ValueError`` when neither)."""
    if "/" not in value and "\\" not in value and (shipped / value / "config.json").is_file():
        return shipped / value
    folder = Path(os.path.expanduser(value))
    if folder.is_dir():
        return folder
    names = (
        sorted(p.name for p in shipped.iterdir() if (p / "config.json").is_file()) if shipped.is_dir() else []
    )
    raise ValueError(
        f"{value!r} is neither a shipped weights name ({', '.join(names) or 'none shipped'}) nor a local "
        "folder saved with save_pretrained"
    )


def attention_layout(context: EncodeContext) -> dict[str, list[int]]:
    """``{layer: [heads, head_dim]}`` of the pipeline's attention layers."""
    return {name: [layer.heads, layer.head_dim] for name, layer in context.adapter.attention_layers().items()}


def check_layout(model: TemplateModel, context: EncodeContext, weights: str) -> None:
    """Refuse, before denoising, weights made for another attention layout."""
    have = {name: list(hd) for name, hd in dict(model.config.layers).items()}
    want = attention_layout(context)
    if have != want:
        raise TemplateError(
            f"template {context.template!r}: the weights {weights!r} (field 'weights') were trained for "
            f"attention layers {have}, but the {context.adapter.name!r} pipeline has {want} (layer: "
            "[heads, head_dim]); train weights for this base model (see the package's shapes.py)"
        )


def fourier_features(value: torch.Tensor, frequencies: int) -> torch.Tensor:
    """(B, D) in [0, 1] -> (B, D * (1 + 2 F)): the value, and sin/cos of k pi value for k = 1..F."""
    k = torch.arange(1, frequencies + 1, device=value.device, dtype=torch.float32) * math.pi
    angles = value.float()[..., None] * k  # (B, D, F)
    return torch.cat([value.float(), angles.sin().flatten(1), angles.cos().flatten(1)], dim=-1)


def module_key(layer: str) -> str:
    return layer.replace(".", "__")


class ValueKVModel(TemplateModel):
    """A value vector (B, value_dim) in [0, 1] -> per-layer keys and values (B, tokens, heads, head_dim)."""

    @register_to_config
    def __init__(
        self,
        layers: dict[str, list[int]] | None = None,
        value_dim: int = 1,
        tokens: int = 4,
        frequencies: int = 6,
        hidden_dim: int = 128,
    ):
        super().__init__()
        self.layers = {n: (int(h), int(d)) for n, (h, d) in dict(layers or {"double_0": [2, 16]}).items()}
        in_dim = value_dim * (1 + 2 * frequencies)
        self.value_mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim)
        )
        self.token_embedding = nn.Parameter(torch.randn(tokens, hidden_dim) * 0.5)
        self.mix = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, hidden_dim), nn.SiLU())
        self.to_k = nn.ModuleDict(
            {module_key(n): nn.Linear(hidden_dim, h * d) for n, (h, d) in self.layers.items()}
        )
        self.to_v = nn.ModuleDict(
            {module_key(n): nn.Linear(hidden_dim, h * d) for n, (h, d) in self.layers.items()}
        )
        for linear in self.to_v.values():  # an untrained model adds (almost) nothing
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    @classmethod
    def for_attention_layers(cls, attention_layers: Mapping[str, Any], **config: Any):
        return cls(
            layers={n: [layer.heads, layer.head_dim] for n, layer in attention_layers.items()}, **config
        )

    def value_of(self, inputs: Any) -> list[float]:  # pragma: no cover - subclasses say
        raise NotImplementedError

    @torch.no_grad()
    def process_inputs(self, inputs: Any, context: EncodeContext | None = None) -> dict[str, Any]:
        return {"value": torch.tensor([self.value_of(inputs)], dtype=torch.float32, device=self.device)}

    def forward(self, value: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        value = value.to(self.token_embedding.dtype).reshape(value.shape[0], -1)
        batch, tokens = value.shape[0], self.token_embedding.shape[0]
        h = self.value_mlp(fourier_features(value, self.config.frequencies).to(value.dtype))
        h = self.mix(h[:, None] + self.token_embedding[None])  # (B, tokens, hidden)
        keys, values = {}, {}
        for name, (heads, head_dim) in self.layers.items():
            keys[name] = self.to_k[module_key(name)](h).view(batch, tokens, heads, head_dim)
            values[name] = self.to_v[module_key(name)](h).view(batch, tokens, heads, head_dim)
        return {"keys": keys, "values": values}


class BrightnessKVModel(ValueKVModel):
    """``scale`` -> kv tokens (``value_dim`` 1)."""

    def value_of(self, inputs: Any) -> list[float]:
        return [float(inputs.scale)]


class BrightnessKVInputs(TemplateInputs):
    scale: float = Field(
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description=(
            "Target mean luminance of the image, 0 (black) to 1 (white): Rec. 709 luma 0.2126 R + 0.7152 G + "
            "0.0722 B of the RGB values in [0, 1], averaged over the image (what the training data measured)."
        ),
    )
    weights: str = Field(
        "shapes",
        description=(
            "Trained weights: a name shipped with the package ('shapes': the dt-base-shapes demo model) or a "
            "local folder saved with save_pretrained. They must match the pipeline's attention layout."
        ),
    )

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: str) -> str:
        resolve_weights(value)
        return value


class ValueKVTemplate(Template):
    """Shared plumbing of the value-encoder kv templates: model loading, layout check, cache typing."""

    Model: type[ValueKVModel] = ValueKVModel
    carriers = ("kv",)
    backbones = ("flux2",)

    def new_model(self, context: EncodeContext, **model_config: Any) -> ValueKVModel:
        """An untrained model sized for the pipeline's attention layers (seeded)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            model = self.Model(layers=attention_layout(context), **model_config)
        return model.to(context.device)

    def model(self, inputs: Any, context: EncodeContext) -> ValueKVModel:
        """The trained model named by ``inputs.weights``, loaded once (the host's model LRU) and reused."""
        from diffusion_templates import models

        folder = resolve_weights(inputs.weights, self.weights_folder())
        model = models.load(self.Model, folder, device=context.device)
        check_layout(model, context, inputs.weights)
        return model

    def weights_folder(self) -> Path:
        return WEIGHTS

    def encode(self, inputs: Any, context: EncodeContext) -> dict[str, dict[str, torch.Tensor]]:
        return self.model(inputs, context).encode(inputs, context)

    def to_cache(self, representation: dict[str, dict[str, torch.Tensor]], context: EncodeContext) -> KVCache:
        return KVCache(
            keys=representation["keys"], values=representation["values"], template=context.template
        )


def demo_inputs(base_image: Any) -> dict[str, float]:
    """For ``dt demo``: 0.3 brighter than the base image, or 0.3 darker when it is already bright."""
    import numpy as np

    rgb = np.asarray(base_image.convert("RGB"), dtype=np.float64) / 255.0
    luminance = float((rgb @ np.array([0.2126, 0.7152, 0.0722])).mean())
    target = luminance + 0.3 if luminance < 0.5 else luminance - 0.3
    return {"scale": round(min(max(target, 0.0), 1.0), 3)}


class BrightnessKVTemplate(ValueKVTemplate):
    """Steers the mean luminance toward ``scale`` through learned extra attention tokens (trained)."""

    Inputs = BrightnessKVInputs
    Model = BrightnessKVModel
    demo_inputs = staticmethod(demo_inputs)
    #: For ``dt demo``: the caption without its background phrase, whose brightness the template decides.
    demo_prompt = staticmethod(lambda prompt: prompt.partition(" on ")[0])
    # Keep in sync with the dt-carrier:kv@brightness-kv / dt-backbone:flux2@brightness-kv keywords.
    carriers = ("kv",)
    backbones = ("flux2",)
