"""Extra keys/values at the attention call, wherever a backbone computes attention.

Two places cover every supported family:

* ``dispatch``: FLUX.1, FLUX.2 and Qwen-Image processors call ``dispatch_attention_fn`` with
  RoPE'd (B, L, heads, head_dim) tensors; it looks the backend function up in
  ``_AttentionBackendRegistry._backends`` at call time, so each function in that table is wrapped.
* ``sdpa``: SD3's and the UNet's processors (``attention_processor.py``) call
  ``F.scaled_dot_product_attention`` on (B, heads, L, head_dim) tensors; that module's ``F`` is
  swapped for a proxy whose ``scaled_dot_product_attention`` is wrapped (torch itself is untouched).

A hook on each attention module pushes :class:`Segment` objects onto the :data:`EXTRA_KV` context
variable for the duration of that module's forward, so only its own attention call sees them,
and only in the calling thread. The wrapper consumes them (resets the variable while the real
function runs, so a nested attention call never appends twice). Wrappers are installed on first
use, reference counted, and the original functions put back when the last user leaves.

With batched classifier-free guidance (SD3, SDXL: ``[uncond, cond]`` in one batch) a segment may
target one half of the batch; the call is then split per half, each half with its own extra K/V.

The same wrappers can also *read* an attention call: inside :func:`capture_kv` the recorder sees the
call's own key and value, (B, L, heads, head_dim) after RoPE and before any extra K/V is appended
(``reference.py`` records a reference image's K/V this way). It is consumed like the segments: a
nested attention call records nothing.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.models import attention_processor
from diffusers.models.attention_dispatch import _AttentionBackendRegistry


@dataclass(frozen=True)
class Segment:
    """Extra (key, value), each (B or 1, L, heads, head_dim), for the whole batch or one CFG half."""

    key: torch.Tensor
    value: torch.Tensor
    half: Literal["uncond", "cond"] | None = None  # None: every sample of the call


EXTRA_KV: ContextVar[tuple[Segment, ...]] = ContextVar("dt_extra_kv", default=())


@contextlib.contextmanager
def extra_kv(segment: Segment) -> Iterator[None]:
    """Make the next attention call(s) in this context see ``segment`` too (after outer segments)."""
    token = EXTRA_KV.set((*EXTRA_KV.get(), segment))
    try:
        yield
    finally:
        EXTRA_KV.reset(token)


#: Called with each attention call's own (key, value), (B, L, heads, head_dim), inside :func:`capture_kv`.
CAPTURE_KV: ContextVar[Callable[[torch.Tensor, torch.Tensor], None] | None] = ContextVar(
    "dt_capture_kv", default=None
)


@contextlib.contextmanager
def capture_kv(recorder: Callable[[torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Make the next attention call(s) in this context report their own K/V to ``recorder``.

    Takes effect only while :func:`attention_interception` is installed. The recorder gets the
    tensors the backend receives (after RoPE, before extra K/V are appended), as (B, L, heads, head_dim).
    """
    token = CAPTURE_KV.set(recorder)
    try:
        yield
    finally:
        CAPTURE_KV.reset(token)


def _expand_batch(extra: torch.Tensor, batch: int) -> torch.Tensor:
    if extra.shape[0] == batch:
        return extra
    if extra.shape[0] == 1:
        return extra.expand(batch, *extra.shape[1:])
    raise ValueError(
        f"kv cache has batch size {extra.shape[0]}, the attention call has {batch} (use 1 or {batch})"
    )


def append_kv(key, value, attn_mask, segments: list[Segment], seq_dim: int):
    """Concatenate the segments' K/V after ``key``/``value`` on ``seq_dim``; widen a mask to match."""
    batch = key.shape[0]
    ks, vs = [key], [value]
    for seg in segments:
        k, v = _expand_batch(seg.key, batch), _expand_batch(seg.value, batch)
        if seq_dim == 2:  # (B, L, H, D) -> (B, H, L, D)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        ks.append(k.to(device=key.device, dtype=key.dtype))
        vs.append(v.to(device=value.device, dtype=value.dtype))
    extra = sum(k.shape[seq_dim] for k in ks[1:])
    key, value = torch.cat(ks, dim=seq_dim), torch.cat(vs, dim=seq_dim)
    if attn_mask is not None and extra:
        fill = True if attn_mask.dtype == torch.bool else 0.0
        attn_mask = F.pad(attn_mask, (0, extra), value=fill)
    return key, value, attn_mask


def _with_segments(fn, kwargs: dict[str, Any], segments: tuple[Segment, ...], seq_dim: int):
    """Run ``fn(**kwargs)`` with the segments appended; split the batch when a segment targets a half."""
    if not any(seg.half for seg in segments):
        kwargs["key"], kwargs["value"], mask = append_kv(
            kwargs["key"], kwargs["value"], kwargs.get("attn_mask"), list(segments), seq_dim
        )
        if "attn_mask" in kwargs:
            kwargs["attn_mask"] = mask
        return fn(**kwargs)
    batch = kwargs["query"].shape[0]
    if batch % 2:
        raise ValueError(f"batched CFG expects an even attention batch, got {batch}")
    n = batch // 2
    outputs = []
    for half, rows in (("uncond", slice(0, n)), ("cond", slice(n, batch))):
        part = {k: _rows(v, rows, batch) for k, v in kwargs.items()}
        mine = [seg for seg in segments if seg.half in (None, half)]
        outputs.append(
            _with_segments(
                fn,
                part,
                tuple(s for s in mine if s.half is None)
                + tuple(Segment(s.key, s.value) for s in mine if s.half),
                seq_dim,
            )
            if mine
            else fn(**part)
        )
    return torch.cat(outputs, dim=0)


def _rows(value: Any, rows: slice, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        return value[rows]
    return value


def _consume(fn, kwargs: dict[str, Any], seq_dim: int):
    recorder = CAPTURE_KV.get()
    if recorder is not None:
        key, value = kwargs["key"], kwargs["value"]
        if seq_dim == 2:  # (B, H, L, D) -> (B, L, H, D)
            key, value = key.transpose(1, 2), value.transpose(1, 2)
        recorder(key, value)
        token = CAPTURE_KV.set(None)  # consumed: nested attention calls record nothing
        try:
            return _consume(fn, kwargs, seq_dim)
        finally:
            CAPTURE_KV.reset(token)
    segments = EXTRA_KV.get()
    if not segments:
        return fn(**kwargs)
    token = EXTRA_KV.set(())  # consumed: nested attention calls see nothing
    try:
        return _with_segments(fn, kwargs, segments, seq_dim)
    finally:
        EXTRA_KV.reset(token)


def _wrap_backend(backend_fn):
    def backend_with_extra_kv(**kwargs: Any):
        return _consume(backend_fn, kwargs, seq_dim=1)

    backend_with_extra_kv.__wrapped__ = backend_fn
    backend_with_extra_kv._dt_wrapper = True
    return backend_with_extra_kv


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def _sdpa_with_extra_kv(*args: Any, **kwargs: Any):
    kwargs.update(zip(_SDPA_ARGS, args, strict=False))
    return _consume(torch.nn.functional.scaled_dot_product_attention, kwargs, seq_dim=2)


class _FunctionalProxy(types.ModuleType):
    """``torch.nn.functional`` for diffusers' attention_processor, with SDPA wrapped."""

    def __init__(self) -> None:
        super().__init__("torch.nn.functional")
        self.scaled_dot_product_attention = _sdpa_with_extra_kv

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.nn.functional, name)


_lock = threading.Lock()
_users = 0
_originals: dict[Any, Any] = {}
#: One wrapper per backend function and one proxy module, made once and reused by every install.
_wrappers: dict[Any, Any] = {}
_proxy: _FunctionalProxy | None = None


@contextlib.contextmanager
def attention_interception() -> Iterator[None]:
    """Install the K/V wrappers for the duration of the block (reference counted, thread safe)."""
    global _users, _proxy
    with _lock:
        if _users == 0:
            backends = _AttentionBackendRegistry._backends
            for name, fn in list(backends.items()):
                _originals[name] = fn
                wrapper = _wrappers.get(fn)
                if wrapper is None:
                    wrapper = _wrappers[fn] = _wrap_backend(fn)
                backends[name] = wrapper
            if _proxy is None:
                _proxy = _FunctionalProxy()
            attention_processor.F = _proxy
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                backends = _AttentionBackendRegistry._backends
                for name, fn in _originals.items():
                    if getattr(backends.get(name), "_dt_wrapper", False):
                        backends[name] = fn
                _originals.clear()
                attention_processor.F = torch.nn.functional
