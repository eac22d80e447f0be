"""Plumbing shared by kv templates that ship trained weights (``brightness-kv``, ``color-kv``,
``structure-kv``): naming and finding the weights, the attention-layout check, and a ``Template``
base that loads the model once and types its output as a ``KVCache``.

Trained weights only fit pipelines with the attention layout they were trained for (layer names,
heads, head_dim); the layout is kept in the model's config (``layers``) and compared before anything
runs, so a mismatch is a clear error instead of a shape error mid-denoising.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .carriers.kv import KVCache
from .context import EncodeContext
from .errors import TemplateError
from .template import Template, TemplateModel

#: Untrained models are initialised from this seed, so that training runs are reproducible.
INIT_SEED = 0


def shipped_weights(folder: Path) -> list[str]:
    """Names of the weights in ``folder`` (each a ``<name>/config.json`` subfolder)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / "config.json").is_file())


def resolve_weights(value: str, shipped: Path) -> Path:
    """A shipped weights name or a local folder -> the folder (``ValueError`` when neither)."""
    if not isinstance(value, str):
        raise ValueError(f"weights must be a string (a shipped name or a folder), got {type(value).__name__}")
    if "/" not in value and "\\" not in value and (shipped / value / "config.json").is_file():
        return shipped / value
    folder = Path(os.path.expanduser(value))
    if folder.is_dir():
        return folder
    names = ", ".join(shipped_weights(shipped)) or "none shipped"
    raise ValueError(
        f"{value!r} is neither a shipped weights name ({names}) nor a local folder saved with save_pretrained"
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


def module_key(layer: str) -> str:
    """A ModuleDict key for an adapter's layer name (module names may not contain dots)."""
    return layer.replace(".", "__")


class KVTemplateModel(TemplateModel):
    """Base of Template models configured by ``layers`` ({name: [heads, head_dim]}) that emit
    ``{"keys": {layer: (B, L, heads, head_dim)}, "values": {...}}``."""

    @classmethod
    def for_attention_layers(cls, attention_layers: Mapping[str, Any], **config: Any):
        """An untrained model with one K/V projection per attention layer of a backbone adapter."""
        return cls(
            layers={n: [layer.heads, layer.head_dim] for n, layer in attention_layers.items()}, **config
        )


def kv_projections(
    layers: Mapping[str, tuple[int, int]], hidden_dim: int
) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    """``(to_k, to_v)``: per layer, a Linear from ``hidden_dim`` to heads * head_dim; the value
    projections start at zero, so an untrained model adds (almost) nothing."""
    to_k = nn.ModuleDict({module_key(n): nn.Linear(hidden_dim, h * d) for n, (h, d) in layers.items()})
    to_v = nn.ModuleDict({module_key(n): nn.Linear(hidden_dim, h * d) for n, (h, d) in layers.items()})
    for linear in to_v.values():
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
    return to_k, to_v


class TrainedKVTemplate(Template):
    """A kv template whose ``Model`` (config key ``layers``) is loaded from ``weights_dir`` or a folder.

    Subclasses set ``Inputs`` (with a ``weights`` field), ``Model`` and ``weights_dir``. ``new_model``
    is what ``dt train`` trains; ``encode`` runs the trained model (loaded once through the host's
    model LRU) after checking its attention layout against the pipeline.
    """

    Model: ClassVar[type[TemplateModel]]
    weights_dir: ClassVar[Path]
    carriers = ("kv",)

    def new_model(self, context: EncodeContext, **model_config: Any) -> TemplateModel:
        """An untrained model sized for the pipeline's attention layers (seeded)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            model = self.Model(layers=attention_layout(context), **model_config)
        return model.to(context.device)

    def model(self, inputs: Any, context: EncodeContext) -> TemplateModel:
        """The trained model named by ``inputs.weights``, loaded once (the host's model LRU) and reused."""
        from . import models

        folder = resolve_weights(inputs.weights, self.weights_dir)
        model = models.load(self.Model, folder, device=context.device)
        check_layout(model, context, inputs.weights)
        return model

    def encode(self, inputs: Any, context: EncodeContext) -> dict[str, dict[str, torch.Tensor]]:
        return self.model(inputs, context).encode(inputs, context)

    def to_cache(self, representation: dict[str, dict[str, torch.Tensor]], context: EncodeContext) -> KVCache:
        return KVCache(
            keys=representation["keys"], values=representation["values"], template=context.template
        )
