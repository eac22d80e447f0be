"""The paper's value encoder: a value vector becomes a few extra attention tokens per layer::

    value -> [v, sin(k pi v), cos(k pi v)]_k -> MLP -> h                      (B, hidden)
    h + learned token embeddings -> SiLU -> Linear -> SiLU                    (B, tokens, hidden)
        -> one Linear per attention layer -> keys, values                     (B, tokens, heads, head_dim)

The value projections start at zero, so an untrained model only dilutes attention a little.
Subclasses say which input fields make the value (:meth:`ValueKVModel.value_of`); ``brightness-kv``
(a luminance) and ``color-kv`` (an RGB triple) are two.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from torch import nn

from .context import EncodeContext
from .trained import KVTemplateModel, kv_projections, module_key


def fourier_features(value: torch.Tensor, frequencies: int) -> torch.Tensor:
    """(B, D) in [0, 1] -> (B, D * (1 + 2 F)): the value, and sin/cos of k pi value for k = 1..F."""
    k = torch.arange(1, frequencies + 1, device=value.device, dtype=torch.float32) * math.pi
    angles = value.float()[..., None] * k  # (B, D, F)
    return torch.cat([value.float(), angles.sin().flatten(1), angles.cos().flatten(1)], dim=-1)


class ValueKVModel(KVTemplateModel):
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
        self.to_k, self.to_v = kv_projections(self.layers, hidden_dim)

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
