"""The ``embedding`` carrier: text-encoder tokens appended to the prompt, or deltas added to it.

Cache (any of the three, at least one):

* ``tokens`` (B, L, D): extra text-encoder tokens appended after the prompt's own tokens (the
  prompt embeddings' dimension D, e.g. T5's on FLUX.1/SD3, the stacked Qwen3 layers on FLUX.2);
* ``delta`` (B, 1 or L, D): added to the prompt's own tokens (1 = every token), the additive mode
  of slider templates;
* ``pooled_delta`` (B, D_pooled): added to the pooled prompt embedding, on backbones that have one
  (FLUX.1, SD3, SDXL).

A batch of 1 applies to every prompt of the call.
Merge: tokens concatenate on the token axis in template order; deltas and pooled deltas add up.
Injection: through ``update_call_kwargs``. The pipeline's own ``encode_prompt`` computes the prompt
embeddings (and the negative ones when the call runs real CFG), the caches are applied, and the
pipeline gets ``prompt_embeds`` (+ pooled, + Qwen-Image's masks) instead of ``prompt``. A negative
template's cache goes to ``negative_prompt_embeds``; it acts only where the call runs an
unconditional branch (a warning says so otherwise). Where both branches must be equally long (SD3
and SDXL batch them; FluxPipeline checks the shapes), the shorter side is padded by repeating its
last token, the padding token its text encoder already pads with.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from pydantic import model_validator

from ..cache import TemplateCache
from ..context import InjectionTarget
from ..errors import CacheError, CarrierConflictError, UnsupportedError
from ..injection import Injection
from ..limits import check_magnitudes, max_embedding_magnitude
from .base import Carrier, joined_template_names

_PLAN = "diffusion_templates.embedding"


class EmbeddingCache(TemplateCache):
    carrier: ClassVar[str] = "embedding"

    tokens: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    pooled_delta: torch.Tensor | None = None

    @model_validator(mode="after")
    def _check_shapes(self) -> EmbeddingCache:
        if self.tokens is None and self.delta is None and self.pooled_delta is None:
            raise ValueError("embedding cache: set tokens, delta or pooled_delta")
        for name, ndim, form in (
            ("tokens", 3, "(B, L, D)"),
            ("delta", 3, "(B, 1 or L, D)"),
            ("pooled_delta", 2, "(B, D_pooled)"),
        ):
            value = getattr(self, name)
            if value is None:
                continue
            if value.ndim != ndim:
                raise ValueError(f"embedding cache: {name} must be {form}, got shape {tuple(value.shape)}")
            if not value.is_floating_point():
                raise ValueError(f"embedding cache: {name} must be a floating tensor, got {value.dtype}")
        if (
            self.tokens is not None
            and self.delta is not None
            and self.tokens.shape[-1] != self.delta.shape[-1]
        ):
            raise ValueError(
                f"embedding cache: tokens have dimension {self.tokens.shape[-1]}, "
                f"delta {self.delta.shape[-1]}"
            )
        return self

    def check_values(self) -> None:
        """tokens, delta and pooled_delta finite, |value| at most ``DT_MAX_EMBEDDING_MAGNITUDE``."""
        candidates = {"tokens": self.tokens, "delta": self.delta, "pooled_delta": self.pooled_delta}
        fields = {name: value for name, value in candidates.items() if value is not None}
        check_magnitudes(self.describe, fields, max_embedding_magnitude(), "DT_MAX_EMBEDDING_MAGNITUDE")


def _batch(tensors: list[torch.Tensor], what: str) -> int:
    batches = {t.shape[0] for t in tensors} - {1}
    if len(batches) > 1:
        raise CarrierConflictError(f"embedding caches have {what} batch sizes {sorted(batches)}")
    return batches.pop() if batches else 1


class EmbeddingCarrier(Carrier):
    name = "embedding"
    cache_class = EmbeddingCache

    def merge_caches(self, caches: list[EmbeddingCache]) -> EmbeddingCache:
        dims = {c.tokens.shape[-1] for c in caches if c.tokens is not None}
        dims |= {c.delta.shape[-1] for c in caches if c.delta is not None}
        if len(dims) > 1:
            raise CarrierConflictError(
                f"embedding caches from {joined_template_names(caches)!r} disagree on the embedding "
                f"dimension: {sorted(dims)}"
            )
        pooled_dims = {c.pooled_delta.shape[-1] for c in caches if c.pooled_delta is not None}
        if len(pooled_dims) > 1:
            raise CarrierConflictError(
                f"embedding caches from {joined_template_names(caches)!r} disagree on the pooled dimension: "
                f"{sorted(pooled_dims)}"
            )
        tokens = [c.tokens for c in caches if c.tokens is not None]
        deltas = [c.delta for c in caches if c.delta is not None]
        pooled = [c.pooled_delta for c in caches if c.pooled_delta is not None]
        merged: dict[str, Any] = {}
        if tokens:
            batch = _batch(tokens, "token")
            dtype = tokens[0].dtype
            merged["tokens"] = torch.cat([t.to(dtype).expand(batch, -1, -1) for t in tokens], dim=1)
        if deltas:
            lengths = {d.shape[1] for d in deltas} - {1}
            if len(lengths) > 1:
                raise CarrierConflictError(
                    f"embedding deltas from {joined_template_names(caches)!r} cover different token counts "
                    f"{sorted(lengths)}; per-token deltas must match the prompt length"
                )
            total = deltas[0]
            for delta in deltas[1:]:
                total = total + delta.to(total.dtype)
            merged["delta"] = total
        if pooled:
            total = pooled[0]
            for delta in pooled[1:]:
                total = total + delta.to(total.dtype)
            merged["pooled_delta"] = total
        return EmbeddingCache(**merged, template=joined_template_names(caches))

    def injection(self, cache: EmbeddingCache, target: InjectionTarget) -> EmbeddingInjection:
        adapter = target.adapter
        reason = adapter.unsupported_reason(self.name)
        if reason:
            raise UnsupportedError(f"embedding cache from template {cache.template!r}: {reason}")
        token_dim, pooled_dim = adapter.text_embedding_dims()
        for name in ("tokens", "delta"):
            value = getattr(cache, name)
            if value is not None and value.shape[-1] != token_dim:
                raise CacheError(
                    f"embedding cache from template {cache.template!r}: {name} have dimension "
                    f"{value.shape[-1]}, {adapter.name!r} prompt embeddings have {token_dim}"
                )
        if cache.pooled_delta is not None:
            if pooled_dim is None:
                raise CacheError(
                    f"embedding cache from template {cache.template!r} has a pooled_delta, but "
                    f"{adapter.name!r} has no pooled prompt embedding"
                )
            if cache.pooled_delta.shape[-1] != pooled_dim:
                raise CacheError(
                    f"embedding cache from template {cache.template!r}: pooled_delta has dimension "
                    f"{cache.pooled_delta.shape[-1]}, {adapter.name!r} pooled embeddings have {pooled_dim}"
                )
        plan = target.call.extras.setdefault(_PLAN, _PromptPlan())
        plan.caches[target.branch] = cache
        return EmbeddingInjection(plan, target)


class _PromptPlan:
    """The embedding caches of one call, per branch; applied once, by whichever injection runs first."""

    def __init__(self) -> None:
        self.caches: dict[str, EmbeddingCache] = {}
        self.done = False


class EmbeddingInjection(Injection):
    def __init__(self, plan: _PromptPlan, target: InjectionTarget):
        self.plan = plan
        self.target = target

    @torch.no_grad()  # as the pipelines' __call__
    def update_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        plan = self.plan
        if plan.done:
            return kwargs
        plan.done = True
        adapter = self.target.adapter
        cfg = adapter.cfg_active(kwargs)
        embeds = adapter.encode_prompt_embeddings(kwargs, cfg)
        limit = getattr(adapter, "max_prompt_tokens", lambda kwargs: None)(kwargs)
        for branch, cache in plan.caches.items():
            if embeds.get(branch) is None:
                warnings.warn(
                    f"embedding cache from negative template {cache.template!r} has no effect: "
                    f"{adapter.name!r} runs no unconditional branch with these arguments (it needs "
                    f"{adapter.cfg_requirement})",
                    stacklevel=4,
                )
                continue
            embeds[branch] = _apply(cache, embeds[branch], limit)
        equal = getattr(adapter, "cfg_equal_lengths", adapter.cfg_style == "batched")
        if equal and embeds.get("uncond") is not None:
            _match_lengths(embeds)
        return adapter.prompt_embedding_kwargs(kwargs, embeds)


def _apply(cache: EmbeddingCache, entry: dict[str, Any], limit: int | None) -> dict[str, Any]:
    tokens, pooled, mask = entry["tokens"], entry["pooled"], entry["mask"]
    batch, length = tokens.shape[:2]
    like = {"device": tokens.device, "dtype": tokens.dtype}

    def fit(value: torch.Tensor, what: str) -> torch.Tensor:
        if value.shape[0] not in (1, batch):
            raise CacheError(
                f"embedding cache from template {cache.template!r}: {what} has batch {value.shape[0]}, "
                f"the call has {batch} prompt(s)"
            )
        return value.to(**like).expand(batch, *value.shape[1:])

    if cache.delta is not None:
        if cache.delta.shape[1] not in (1, length):
            raise CacheError(
                f"embedding cache from template {cache.template!r}: delta covers {cache.delta.shape[1]} "
                f"tokens, the prompt embeddings have {length} (give 1 to add it to every token)"
            )
        tokens = tokens + fit(cache.delta, "delta")
    if cache.tokens is not None:
        extra = fit(cache.tokens, "tokens")
        if limit is not None and length + extra.shape[1] > limit:
            raise CacheError(
                f"embedding cache from template {cache.template!r}: the prompt ({length} tokens) and the "
                f"template's {extra.shape[1]} tokens exceed max_sequence_length={limit}, which the pipeline "
                "would cut them to; raise max_sequence_length"
            )
        tokens = torch.cat([tokens, extra], dim=1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(batch, extra.shape[1])], dim=1)
    if cache.pooled_delta is not None:
        pooled = pooled + fit(cache.pooled_delta, "pooled_delta").to(pooled.dtype)
    return {"tokens": tokens, "pooled": pooled, "mask": mask}


def _match_lengths(embeds: dict[str, dict[str, Any]]) -> None:
    """Batched CFG concatenates both branches: pad the shorter by repeating its last (padding) token."""
    cond, uncond = embeds["cond"], embeds["uncond"]
    short, long = (cond, uncond) if cond["tokens"].shape[1] < uncond["tokens"].shape[1] else (uncond, cond)
    missing = long["tokens"].shape[1] - short["tokens"].shape[1]
    if missing:
        last = short["tokens"][:, -1:]
        short["tokens"] = torch.cat([short["tokens"], last.expand(-1, missing, -1)], dim=1)
