"""What the host hands to hooks: the pipeline being driven, its backbone adapter, the call state."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from .backbones.base import BackboneAdapter

Branch = Literal["cond", "uncond"]
#: What the denoiser computes in one call: one branch, or ``"batched"`` = ``[uncond, cond]`` halves.
CallBranch = Literal["cond", "uncond", "batched"]


@dataclass(frozen=True)
class BatchLayout:
    """Which rows of one denoiser call's batch belong to which CFG branch.

    ``rows`` covers the batch in order, e.g. ``(("uncond", slice(0, 2)), ("cond", slice(2, 4)))`` for
    batched CFG over two images, or ``(("cond", slice(0, 2)),)`` for a conditional-only call. Branch
    names other than "cond"/"uncond" (a guider's extra prediction) may appear; a cache reaches rows
    of its own branch only. Set per denoiser call by ``injection.BranchTracker`` from what that call
    is (never from flags left over by an earlier call).
    """

    rows: tuple[tuple[str, slice], ...]
    batch: int

    @classmethod
    def single(cls, branch: str, batch: int) -> BatchLayout:
        return cls(((branch, slice(0, batch)),), batch)

    def rows_of(self, branch: str) -> slice | None:
        """The rows of ``branch`` (None when the call computes no such rows)."""
        for name, rows in self.rows:
            if name == branch:
                return rows
        return None

    @property
    def whole(self) -> str | None:
        """The branch that owns every row, or None when the batch is split between branches."""
        return self.rows[0][0] if len(self.rows) == 1 else None


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
    #: Rows per branch of the denoiser call running now (None before the first denoiser call).
    layout: BatchLayout | None = None
    denoiser_calls: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    kwargs: dict[str, Any] = field(default_factory=dict)
    """The wrapped pipeline call's arguments, for checks in ``inject`` (size of the image, ...); read only."""

    @property
    def active(self) -> bool:
        """Whether the code running now belongs to this call."""
        return CURRENT_CALL.get() is self

    def reaches(self, branch: str) -> bool:
        """Whether a cache for ``branch`` ("cond"/"uncond") applies to the denoiser call running now
        as a whole (the batched case, where it applies to one half, is handled by the carriers)."""
        return self.active and self.branch == branch


#: The TemplatePipeline call running in this thread/task. Injection hooks sit on shared modules for
#: the duration of a call; they act only when the module runs inside *their* call, so a bare call of
#: the same pipeline from another thread never sees them.
CURRENT_CALL: ContextVar[CallState | None] = ContextVar("dt_current_call", default=None)


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
