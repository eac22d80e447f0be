"""Resource bounds on untrusted input: cache files, merged K/V lengths, LoRA ranks.

Each bound is read from the environment at the moment it is checked (so a server can change it
without re-importing anything) and falls back to a default sized for real checkpoints:

==========================  ===========  =========================================================
variable                    default      bounds
==========================  ===========  =========================================================
``DT_MAX_CACHE_BYTES``      4 GiB        tensor bytes a cache file may declare (checked from the
                                         safetensors header, before anything is read or allocated)
``DT_MAX_KV_TOKENS``        16384        extra K/V tokens per attention layer, after merging
``DT_MAX_LORA_RANK``        1024         LoRA rank per module, after merging
==========================  ===========  =========================================================

A bound that is exceeded is a :class:`~diffusion_templates.errors.CacheError` naming the
numbers and the variable to raise it.
"""

from __future__ import annotations

import os

from .errors import CacheError

DEFAULT_MAX_CACHE_BYTES = 4 * 1024**3
DEFAULT_MAX_KV_TOKENS = 16384
DEFAULT_MAX_LORA_RANK = 1024

#: safetensors caps its JSON header at 100 MB; a cache header is a few kilobytes.
MAX_HEADER_BYTES = 100_000_000


def _read(var: str, default: int) -> int:
    raw = os.environ.get(var)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{var}={raw!r}: expected a positive integer") from None
    if value < 1:
        raise ValueError(f"{var}={raw!r}: expected a positive integer")
    return value


def max_cache_bytes() -> int:
    """Most tensor bytes one cache file may hold (``DT_MAX_CACHE_BYTES``)."""
    return _read("DT_MAX_CACHE_BYTES", DEFAULT_MAX_CACHE_BYTES)


def max_kv_tokens() -> int:
    """Most extra K/V tokens per attention layer in one call and branch (``DT_MAX_KV_TOKENS``)."""
    return _read("DT_MAX_KV_TOKENS", DEFAULT_MAX_KV_TOKENS)


def max_lora_rank() -> int:
    """Highest LoRA rank per module in one call and branch (``DT_MAX_LORA_RANK``)."""
    return _read("DT_MAX_LORA_RANK", DEFAULT_MAX_LORA_RANK)


def check_kv_tokens(template: str | None, layer: str, tokens: int) -> None:
    """Refuse a (merged) kv cache with more than ``DT_MAX_KV_TOKENS`` tokens at ``layer``."""
    limit = max_kv_tokens()
    if tokens > limit:
        raise CacheError(
            f"kv cache from template {template!r}, layer {layer!r}: {tokens} extra tokens, more than "
            f"the limit of {limit} per layer (DT_MAX_KV_TOKENS)"
        )


def check_lora_rank(template: str | None, module: str, rank: int) -> None:
    """Refuse a (merged) lora cache whose rank at ``module`` exceeds ``DT_MAX_LORA_RANK``."""
    limit = max_lora_rank()
    if rank > limit:
        raise CacheError(
            f"lora cache from template {template!r}, module {module!r}: rank {rank}, more than the "
            f"limit of {limit} per module (DT_MAX_LORA_RANK)"
        )
