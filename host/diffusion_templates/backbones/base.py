"""The adapter interface every backbone implements."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Literal

import torch

from ..context import BatchLayout


def unwrap_compiled(module: Any) -> Any:
    """The module a ``torch.compile(module)`` wrapper (dynamo's ``OptimizedModule``) runs; ``module``
    itself otherwise. Hooks and processors go on that inner module: the wrapper calls it."""
    # Without torch._dynamo imported no OptimizedModule can exist (and importing it costs seconds).
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    while eval_frame is not None and isinstance(module, eval_frame.OptimizedModule):
        module = module._orig_mod
    return module


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module a carrier may reach, under the adapter's stable name."""

    name: str
    path: str
    module: torch.nn.Module
    heads: int
    head_dim: int


class BackboneAdapter:
    """Subclass per model family: set the class attributes, implement :meth:`attention_layers`."""

    name: ClassVar[str]
    denoiser_attr: ClassVar[str] = "transformer"
    denoiser_classes: ClassVar[tuple[str, ...]] = ()
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    cfg_style: ClassVar[Literal["sequential", "batched", "none"]] = "sequential"
    carriers: ClassVar[frozenset[str]] = frozenset()
    #: Why a known carrier is *not* in ``carriers`` (shown by ``dt info`` and the support matrix).
    unsupported_reasons: ClassVar[dict[str, str]] = {}
    lora_prefix: ClassVar[str] = "transformer"

    def __init__(self, pipe: Any):
        self.pipe = pipe

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        denoiser = unwrap_compiled(getattr(pipe, cls.denoiser_attr, None))
        if denoiser is None:
            return False
        return any(klass.__name__ in cls.denoiser_classes for klass in type(denoiser).__mro__)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The denoiser module itself (inside a ``torch.compile`` wrapper, when there is one)."""
        return unwrap_compiled(getattr(self.pipe, self.denoiser_attr))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @cached_property
    def _layers(self) -> dict[str, AttentionLayer]:
        return self.attention_layers_of(self.denoiser)

    def attention_layers(self) -> dict[str, AttentionLayer]:
        """Attention layers by stable name, in execution order."""
        return self._layers

    def attention_layers_of(self, denoiser: torch.nn.Module) -> dict[str, AttentionLayer]:
        raise NotImplementedError

    # -- which rows of a denoiser call are which CFG branch ----------------------------------------------
    def images_of_call(self, kwargs: Mapping[str, Any]) -> int | None:
        """Images a pipeline call makes: prompts (a string, a list, or ``prompt_embeds`` rows) times
        ``num_images_per_prompt``; None when the arguments name no prompt."""
        prompt = kwargs.get("prompt")
        if isinstance(prompt, str):
            prompts = 1
        elif isinstance(prompt, (list, tuple)):
            prompts = len(prompt)
        elif isinstance(kwargs.get("prompt_embeds"), torch.Tensor):
            prompts = int(kwargs["prompt_embeds"].shape[0])
        else:
            return None
        return prompts * int(kwargs.get("num_images_per_prompt") or 1)

    def batch_layout(
        self, batch: int, images: int | None, context: str | None, inputs: Mapping[str, Any]
    ) -> BatchLayout:
        """The rows per CFG branch of one denoiser call, from that call alone.

        ``batch``: the call's batch; ``images``: the pipeline call's image count (None if unknown);
        ``context``: the name of the diffusers cache context the call runs in (None outside one);
        ``inputs``: the denoiser call's keyword arguments. Sequential CFG (``cfg_style``
        ``"sequential"``): the pipeline names the branch with ``cache_context("cond"/"uncond")``.
        Batched CFG (``"batched"``): a call of twice the image count outside a cache context is
        ``[uncond, cond]``. Anything else is conditional as a whole (pipelines without CFG, direct
        calls in ``injecting()``), except inside ``cache_context("uncond")``.
        """
        if context == "uncond":
            return BatchLayout.single("uncond", batch)
        if context is None and self.cfg_style == "batched" and images and batch == 2 * images:
            return BatchLayout.cfg(images)
        return BatchLayout.single("cond", batch)

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {
            "name": cls.name,
            "denoiser": list(cls.denoiser_classes),
            "pipelines": list(cls.pipeline_classes),
            "cfg_style": cls.cfg_style,
            "carriers": sorted(cls.carriers),
            "unsupported": dict(cls.unsupported_reasons),
        }


def blocks_attention(denoiser: torch.nn.Module, blocks_attr: str, prefix: str) -> dict[str, AttentionLayer]:
    """``<blocks_attr>[i].attn`` as ``<prefix>_<i>`` (the FLUX-family layout)."""
    layers = {}
    for i, block in enumerate(getattr(denoiser, blocks_attr, ())):
        attn = block.attn
        layers[f"{prefix}_{i}"] = AttentionLayer(
            f"{prefix}_{i}", f"{blocks_attr}.{i}.attn", attn, attn.heads, attn.head_dim
        )
    return layers


def legacy_attention(name: str, path: str, attn: torch.nn.Module) -> AttentionLayer:
    """An ``Attention`` module of diffusers' classic kind (``heads`` set, head dim from ``to_k``)."""
    return AttentionLayer(name, path, attn, attn.heads, attn.to_k.out_features // attn.heads)
