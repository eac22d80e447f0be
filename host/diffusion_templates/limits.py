"""Bounds on untrusted input: cache files, merged K/V lengths, LoRA ranks, and the values caches hold.

Each bound is read from the environment at the moment it is checked (so a server can change it
without re-importing anything) and falls back to a default sized for real checkpoints:

==============================  ===========  =====================================================
variable                        default      bounds
==============================  ===========  =====================================================
``DT_MAX_CACHE_BYTES``          4 GiB        tensor bytes a cache file may declare (checked from the
                                             safetensors header, before anything is read or allocated)
``DT_MAX_KV_TOKENS``            16384        extra K/V tokens per attention layer, after merging
``DT_MAX_LORA_RANK``            1024         LoRA rank per module, after merging
``DT_MAX_KV_MAGNITUDE``         65504        largest |value| of a kv cache's keys and values
``DT_MAX_LORA_MAGNITUDE``       10000        largest |value| of a LoRA's down factor, and of its up
                                             factor times its scaling (what merging folds together)
``DT_MAX_EMBEDDING_MAGNITUDE``  65504        largest |value| of embedding tokens, deltas, pooled deltas
``DT_MAX_RESIDUAL_MAGNITUDE``   65504        largest |value| of static residuals and control inputs
``DT_MAX_LATENT_MAGNITUDE``     65504        largest |value| of init_latents / latent_mask latents
``DT_MAX_GUIDANCE_STRENGTH``    4            a guidance term's strength, and strength x step weight
``DT_MAX_CONDITIONING_SCALE``   10           |conditioning_scale| of a residual (ControlNet) entry
==============================  ===========  =====================================================

65504 is float16's largest finite value: a larger activation turns into ``inf`` in a float16
pipeline, and no real one comes near it. Every floating tensor must also be finite, and masks and
images (``latent_mask``, ``init_latents``) must lie in [0, 1]: those are conventions, not settings.
A Gauss-Newton guidance step of weight 1 closes the gap to the target, 2 overshoots it by the whole
gap, more diverges: 4 leaves room for non-linear statistics.

A bound that is exceeded is a :class:`~diffusion_templates.errors.CacheError` naming the template,
the tensor or field, the numbers and the variable to raise it. Value checks cost one fused reduction
(``aminmax``) per tensor, once per tensor: the result is remembered per tensor object and version
counter (:func:`value_ranges`), so caches the store hands out again are not measured again.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable, Mapping

import torch

from .errors import CacheError

DEFAULT_MAX_CACHE_BYTES = 4 * 1024**3
DEFAULT_MAX_KV_TOKENS = 16384
DEFAULT_MAX_LORA_RANK = 1024
FLOAT16_MAX = 65504.0
DEFAULT_MAX_KV_MAGNITUDE = FLOAT16_MAX
DEFAULT_MAX_LORA_MAGNITUDE = 1e4
DEFAULT_MAX_EMBEDDING_MAGNITUDE = FLOAT16_MAX
DEFAULT_MAX_RESIDUAL_MAGNITUDE = FLOAT16_MAX
DEFAULT_MAX_LATENT_MAGNITUDE = FLOAT16_MAX
DEFAULT_MAX_GUIDANCE_STRENGTH = 4.0
DEFAULT_MAX_CONDITIONING_SCALE = 10.0

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


def _read_float(var: str, default: float) -> float:
    raw = os.environ.get(var)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError(f"{var}={raw!r}: expected a positive finite number") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{var}={raw!r}: expected a positive finite number")
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


def max_kv_magnitude() -> float:
    """Largest |value| of a kv cache's keys and values (``DT_MAX_KV_MAGNITUDE``)."""
    return _read_float("DT_MAX_KV_MAGNITUDE", DEFAULT_MAX_KV_MAGNITUDE)


def max_lora_magnitude() -> float:
    """Largest |value| of a LoRA down factor and of scaling x up (``DT_MAX_LORA_MAGNITUDE``)."""
    return _read_float("DT_MAX_LORA_MAGNITUDE", DEFAULT_MAX_LORA_MAGNITUDE)


def max_embedding_magnitude() -> float:
    """Largest |value| of an embedding cache's tensors (``DT_MAX_EMBEDDING_MAGNITUDE``)."""
    return _read_float("DT_MAX_EMBEDDING_MAGNITUDE", DEFAULT_MAX_EMBEDDING_MAGNITUDE)


def max_residual_magnitude() -> float:
    """Largest |value| of a residual cache's tensors (``DT_MAX_RESIDUAL_MAGNITUDE``)."""
    return _read_float("DT_MAX_RESIDUAL_MAGNITUDE", DEFAULT_MAX_RESIDUAL_MAGNITUDE)


def max_latent_magnitude() -> float:
    """Largest |value| of init_latents / latent_mask latents (``DT_MAX_LATENT_MAGNITUDE``)."""
    return _read_float("DT_MAX_LATENT_MAGNITUDE", DEFAULT_MAX_LATENT_MAGNITUDE)


def max_guidance_strength() -> float:
    """Largest guidance strength, and strength x step weight (``DT_MAX_GUIDANCE_STRENGTH``)."""
    return _read_float("DT_MAX_GUIDANCE_STRENGTH", DEFAULT_MAX_GUIDANCE_STRENGTH)


def max_conditioning_scale() -> float:
    """Largest |conditioning_scale| of a residual entry (``DT_MAX_CONDITIONING_SCALE``)."""
    return _read_float("DT_MAX_CONDITIONING_SCALE", DEFAULT_MAX_CONDITIONING_SCALE)


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


# -- values --------------------------------------------------------------------------------------------
# id(tensor) -> (weak reference, version counter, min, max). By identity, so the copies the store hands
# out, which share their tensors, are measured once; an in-place change bumps the version and is
# measured again. The reference's callback drops the entry when the tensor goes (before its id can be
# reused). A plain dict: torch's WeakIdKeyDictionary costs ~10x more per lookup, on every call.
_RANGES: dict[int, tuple[weakref.ref, int, float, float]] = {}
_NO_VERSION = -1  # inference tensors keep no version counter (and cannot change outside inference mode)


def _version(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:
        return _NO_VERSION


def _forget(key: int) -> Callable[[weakref.ref], None]:
    return lambda _ref: _RANGES.pop(key, None)


def value_ranges(tensors: list[torch.Tensor]) -> list[tuple[float, float]]:
    """(min, max) of each floating tensor (NaN when it holds a NaN; ±inf for infinities).

    One fused ``aminmax`` per tensor not measured before (or changed in place since), and one
    device-to-host copy per device for all of them. Empty tensors give (0, 0).
    """
    out: list[tuple[float, float] | None] = [None] * len(tensors)
    pending: dict[torch.device, list[int]] = {}
    for i, tensor in enumerate(tensors):
        known = _RANGES.get(id(tensor))
        if known is not None and known[0]() is tensor and known[1] == _version(tensor):
            out[i] = known[2:]
        elif tensor.numel() == 0:
            out[i] = (0.0, 0.0)
        else:
            pending.setdefault(tensor.device, []).append(i)
    if not pending:  # the usual case for caches seen before: no grad mode to enter (tens of µs)
        return out  # type: ignore[return-value]
    with torch.no_grad():
        for indices in pending.values():
            stats = []
            for i in indices:
                tensor = tensors[i].detach()
                if tensor.element_size() == 1 or not tensor.is_floating_point():
                    tensor = tensor.float()  # float8 and bool have no aminmax; exact in float32
                stats.append(torch.stack(torch.aminmax(tensor)).float())
            for i, (low, high) in zip(indices, torch.stack(stats).tolist(), strict=True):
                tensor = tensors[i]
                out[i] = (low, high)
                key = id(tensor)
                _RANGES[key] = (weakref.ref(tensor, _forget(key)), _version(tensor), low, high)
    return out  # type: ignore[return-value]


def _fmt(value: float) -> str:
    return f"{value:.6g}"


#: A cache's tensors as its fields hold them: a tensor, or a dict of tensors (named ``field/key``).
Fields = Mapping[str, torch.Tensor | Mapping[str, torch.Tensor]]
#: Who is checked, for the error: a string, or a function making it (called on the error path only).
Who = str | Callable[[], str]


def _flatten(fields: Fields) -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for name, value in fields.items():
        if isinstance(value, torch.Tensor):
            flat[name] = value
        else:
            flat.update({f"{name}/{key}": tensor for key, tensor in value.items()})
    return flat


def _seen_within(fields: Fields, low: float, high: float, scales: Mapping[str, Mapping[str, float]]) -> bool:
    """Whether every tensor was measured before, unchanged since, and lay within [low, high] (times its
    scale): the path of every call with caches the store or the user reuse, with no reduction and no
    allocation. ``False`` means "measure and report", not "bad"."""
    get = _RANGES.get
    try:
        for name, value in fields.items():
            items = ((None, value),) if isinstance(value, torch.Tensor) else value.items()
            factors = scales.get(name)
            for key, tensor in items:
                known = get(id(tensor))
                if known is None or known[0]() is not tensor or known[1] != tensor._version:
                    return False
                factor = 1.0 if factors is None else abs(factors.get(key, 1.0))
                if not (low <= known[2] * factor and known[3] * factor <= high):  # False for NaN too
                    return False
    except RuntimeError:  # an inference tensor has no version counter: measured the long way
        return False
    return True


def _name(who: Who) -> str:
    return who if isinstance(who, str) else who()


def check_magnitudes(
    who: Who,
    fields: Fields,
    limit: float,
    setting: str,
    *,
    scales: Mapping[str, Mapping[str, float]] | None = None,
) -> None:
    """Every tensor of ``fields`` finite with |value| at most ``limit``; a tensor of a dict field
    ``f`` is first multiplied by ``scales[f][key]`` where given (a LoRA's up factor by its scaling).

    ``who`` names the cache and template (``"kv cache from template 'x'"``); the error names the
    tensor (``field/key``), its largest |value|, the limit and ``setting``, the variable that raises it.
    """
    scales = scales or {}
    if _seen_within(fields, -limit, limit, scales):
        return
    tensors = _flatten(fields)
    for name, (low, high) in zip(tensors, value_ranges(list(tensors.values())), strict=True):
        if not (math.isfinite(low) and math.isfinite(high)):
            raise CacheError(
                f"{_name(who)}: tensor {name!r} holds NaN or infinite values; values must be finite"
            )
        field, _, key = name.partition("/")
        factor = scales.get(field, {}).get(key) if key else None
        magnitude = max(-low, high) * (1.0 if factor is None else abs(factor))
        if not magnitude <= limit:  # also a NaN scale
            scaled = " (times its scaling)" if factor is not None else ""
            raise CacheError(
                f"{_name(who)}: tensor {name!r} reaches |value| {_fmt(magnitude)}{scaled}, more than the "
                f"limit of {_fmt(limit)} ({setting})"
            )


def check_finite(who: Who, fields: Fields) -> None:
    """Every tensor finite (no NaN, no infinity), without a magnitude bound."""
    check_magnitudes(who, fields, math.inf, "")


def check_unit_range(who: Who, fields: Fields) -> None:
    """Every tensor finite and within [0, 1] (masks, images)."""
    if _seen_within(fields, 0.0, 1.0, {}):
        return
    tensors = _flatten(fields)
    for name, (low, high) in zip(tensors, value_ranges(list(tensors.values())), strict=True):
        if not (math.isfinite(low) and math.isfinite(high)):
            raise CacheError(
                f"{_name(who)}: tensor {name!r} holds NaN or infinite values; values must be finite"
            )
        if low < 0.0 or high > 1.0:
            raise CacheError(
                f"{_name(who)}: tensor {name!r} ranges over [{_fmt(low)}, {_fmt(high)}], outside the "
                "bound [0, 1]"
            )


def check_number(who: Who, field: str, value: float, limit: float, setting: str) -> None:
    """A finite number with |value| at most ``limit``."""
    if not math.isfinite(value):
        raise CacheError(f"{_name(who)}: {field} is {value!r}; it must be finite")
    if abs(value) > limit:
        raise CacheError(
            f"{_name(who)}: {field} is {_fmt(value)}, more than the limit of {_fmt(limit)} ({setting})"
        )
