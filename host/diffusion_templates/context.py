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
    #: What extra prediction this call is, beside the pipeline's ordinary CFG branches (e.g.
    #: ``"skip_layers"`` for SD3's skip-layer guidance call, whose rows are conditional); None otherwise.
    purpose: str | None = None

    @classmethod
    def single(cls, branch: str, batch: int, purpose: str | None = None) -> BatchLayout:
        return cls(((branch, slice(0, batch)),), batch, purpose)

    @classmethod
    def cfg(cls, images: int) -> BatchLayout:
        """Batched classifier-free guidance over ``images`` images: ``[uncond, cond]``, uncond first."""
        return cls((("uncond", slice(0, images)), ("cond", slice(images, 2 * images))), 2 * images)

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

    ``layout`` says which rows of the denoiser call running now belong to which branch; the backbone
    adapter decides it from that call alone (``BackboneAdapter.batch_layout``): the diffusers cache
    context the pipeline set (``transformer.cache_context("cond"/"uncond")``, sequential CFG), the
    adapter's batched ``[uncond, cond]`` layout when the call's batch is twice the call's image count,
    and the call's own arguments (SD3's skip-layer call). Nothing is read from pipeline flags a
    previous call left behind. A denoiser call outside any cache context whose batch is the image
    count, or made directly in ``injecting()`` (``direct``), is conditional. ``branch`` mirrors it:
    the branch owning every row, or ``"batched"`` for ``[uncond, cond]`` halves.
    """

    branch: CallBranch = "cond"
    #: Rows per branch of the denoiser call running now (None before the first denoiser call).
    layout: BatchLayout | None = None
    #: Set by the caller of ``TemplatePipeline.injecting()`` to give its direct denoiser calls this
    #: layout instead of the adapter's (e.g. ``BatchLayout.cfg(n)`` for a custom sampler batching
    #: ``[uncond, cond]``); each denoiser call's batch must then equal ``fixed_layout.batch``.
    fixed_layout: BatchLayout | None = None
    #: True in ``injecting()``: the caller calls the denoiser directly, no pipeline decides its rows, so
    #: every call is one branch as a whole (``cond``, or ``uncond`` inside ``cache_context("uncond")``)
    #: unless ``fixed_layout`` says otherwise, whatever ``call_kwargs`` say about the image count.
    direct: bool = False
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

    @property
    def images(self) -> int | None:
        """How many images the call makes, from its arguments (prompts x ``num_images_per_prompt``);
        None when they do not tell (``injecting()`` without ``call_kwargs``)."""
        return self.adapter.images_of_call(self.call.kwargs)
