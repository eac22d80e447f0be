"""What the host hands to hooks: the pipeline being driven, its backbone adapter, the call state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from .backbones.base import BackboneAdapter

Branch = Literal["cond", "uncond"]
#: What the denoiser computes in one call: one branch, or ``"batched"`` = ``[uncond, cond]`` halves.
CallBranch = Literal["cond", "uncond", "batched"]


@dataclass
class CallState:
    """Mutable state of one TemplatePipeline call, shared by that call's injections.

    ``branch`` is the classifier-free-guidance branch the denoiser is computing right now. With
    sequential CFG it follows diffusers' ``transformer.cache_context("cond"/"uncond")``; a denoiser
    call outside any cache context counts as ``"cond"`` (pipelines without CFG). With batched CFG
    (SD3, SDXL) it is ``"batched"`` while the pipeline's ``do_classifier_free_guidance`` is on:
    the first half of the denoiser batch is unconditional, the second conditional.
    """

    branch: CallBranch = "cond"
    denoiser_calls: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class EncodeContext:
    """Given to ``encode``/``to_cache``: where the caches will be injected."""

    pipe: Any
    adapter: BackboneAdapter
    template: str
    negative: bool = False

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    @property
    def dtype(self) -> torch.dtype:
        return self.adapter.dtype


@dataclass
class InjectionTarget:
    """Given to ``inject``: the pipeline, its adapter, the branch the cache is for, the call state."""

    pipe: Any
    adapter: BackboneAdapter
    branch: Branch
    call: CallState
