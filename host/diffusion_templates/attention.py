"""Extra keys/values at the attention call, for every backend diffusers dispatches to.

Attention processors of FLUX.1, FLUX.2 and Qwen-Image compute RoPE'd ``query/key/value`` in
(B, L, heads, head_dim) layout and call ``dispatch_attention_fn``, which looks the backend
function up in ``_AttentionBackendRegistry._backends`` at call time. While any injection needs it,
each backend function in that table is wrapped by a shim that appends the extra K/V held in a
context variable (set per attention module by a hook, so only that module's call sees it, and
only in the thread making the call). The shim is installed on first use, reference counted, and
the original functions are put back when the last user leaves.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import _AttentionBackendRegistry

# (key, value) to append, each (B or 1, L, heads, head_dim); None outside hooked attention calls.
EXTRA_KV: ContextVar[tuple[torch.Tensor, torch.Tensor] | None] = ContextVar("dt_extra_kv", default=None)

_lock = threading.Lock()
_users = 0
_originals: dict[Any, Any] = {}


def _expand_batch(extra: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    if extra.shape[0] == batch:
        return extra
    if extra.shape[0] == 1:
        return extra.expand(batch, *extra.shape[1:])
    raise ValueError(
        f"kv cache {what} has batch size {extra.shape[0]}, the attention call has {batch} (use 1 or {batch})"
    )


def append_kv(key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None, extra_k, extra_v):
    """Concatenate extra K/V after ``key``/``value`` on the sequence axis; widen a mask to match."""
    batch = key.shape[0]
    extra_k = _expand_batch(extra_k, batch, "keys").to(device=key.device, dtype=key.dtype)
    extra_v = _expand_batch(extra_v, batch, "values").to(device=value.device, dtype=value.dtype)
    key = torch.cat([key, extra_k], dim=1)
    value = torch.cat([value, extra_v], dim=1)
    if attn_mask is not None:
        fill = True if attn_mask.dtype == torch.bool else 0.0
        attn_mask = F.pad(attn_mask, (0, extra_k.shape[1]), value=fill)
    return key, value, attn_mask


def _make_shim(backend_fn):
    def shim(**kwargs: Any):
        extra = EXTRA_KV.get()
        if extra is not None:
            kwargs["key"], kwargs["value"], mask = append_kv(
                kwargs["key"], kwargs["value"], kwargs.get("attn_mask"), *extra
            )
            if "attn_mask" in kwargs:
                kwargs["attn_mask"] = mask
        return backend_fn(**kwargs)

    shim.__wrapped__ = backend_fn
    shim._dt_shim = True
    return shim


@contextlib.contextmanager
def attention_interception() -> Iterator[None]:
    """Install the K/V shim for the duration of the block (reference counted, thread safe)."""
    global _users
    with _lock:
        if _users == 0:
            backends = _AttentionBackendRegistry._backends
            for name, fn in list(backends.items()):
                _originals[name] = fn
                backends[name] = _make_shim(fn)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                backends = _AttentionBackendRegistry._backends
                for name, fn in _originals.items():
                    if getattr(backends.get(name), "_dt_shim", False):
                        backends[name] = fn
                _originals.clear()
