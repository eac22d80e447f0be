"""Small helpers shared by the host tests."""

from __future__ import annotations

import contextlib

import torch

from diffusion_templates.testing.tiny import tiny_call_kwargs

FAMILIES = ["flux2_klein", "flux", "sd3", "qwen_image", "sdxl"]
"""Tiny pipeline families with a backbone adapter (testing/tiny.py builds them offline)."""


def run(pipe_or_tp, family: str, *, cfg: bool = True, output_type: str = "latent", seed: int = 0, **kwargs):
    """One fast deterministic call; returns the output images/latents tensor-or-array."""
    call = tiny_call_kwargs(family, cfg=cfg, output_type=output_type, seed=seed)
    call.update(kwargs)
    call.setdefault("prompt", "a red circle")
    return pipe_or_tp(**call).images


def reference_attention(query, key, value, mask=None):
    """softmax(q k^T / sqrt(d) + mask) v written out, in (B, L, heads, head_dim) layout."""
    q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).to(query.dtype)


def _extend(key, value, mask, cache, name):
    """(B, L, H, D) key/value with the cache's tensors for layer ``name`` appended; mask widened."""
    if name not in cache.keys:
        return key, value, mask
    k = cache.keys[name].to(key.dtype).expand(key.shape[0], -1, -1, -1)
    v = cache.values[name].to(value.dtype).expand(value.shape[0], -1, -1, -1)
    if mask is not None:
        pad = torch.ones if mask.dtype == torch.bool else torch.zeros
        mask = torch.cat([mask, pad(*mask.shape[:-1], k.shape[1], dtype=mask.dtype)], dim=-1)
    return torch.cat([key, k], dim=1), torch.cat([value, v], dim=1), mask


class _ReferenceFunctional:
    """Stands in for ``torch.nn.functional`` inside diffusers' attention_processor module."""

    def __init__(self, attention):
        self._attention = attention

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    def scaled_dot_product_attention(self, query, key, value, attn_mask=None, **_):
        # (B, H, L, D) here; the reference works in (B, L, H, D)
        out = self._attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask)
        return out.transpose(1, 2)


@contextlib.contextmanager
def hand_written_kv(monkeypatch, transformer, modules, cache, layers):
    """A reference for the kv carrier that shares none of its code.

    Forward pre-hooks on each attention module record which layer is running; the attention
    functions diffusers' processors call (``dispatch_attention_fn`` imported by the FLUX/Qwen
    transformer modules, ``F.scaled_dot_product_attention`` in attention_processor for SD3 and
    the UNet) are replaced by :func:`reference_attention` over keys/values with the cache's
    tensors concatenated at the end of the sequence. Applies to every sample of the batch.
    """
    from diffusers.models import attention_processor

    current: list[str | None] = [None]
    handles = []
    for name, layer in layers.items():
        handles.append(layer.module.register_forward_pre_hook(lambda m, a, n=name: current.__setitem__(0, n)))
        handles.append(layer.module.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))

    def attention(query, key, value, mask):  # (B, L, H, D)
        key, value, mask = _extend(key, value, mask, cache, current[0])
        return reference_attention(query, key, value, mask)

    def dispatch(query, key, value, attn_mask=None, **_):
        return attention(query, key, value, attn_mask)

    for module in modules:
        monkeypatch.setattr(module, "dispatch_attention_fn", dispatch)
    monkeypatch.setattr(attention_processor, "F", _ReferenceFunctional(attention))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        monkeypatch.undo()


def count_denoiser_calls(denoiser):
    """A forward pre-hook counting denoiser calls; returns (counter list, handle)."""
    calls = []
    handle = denoiser.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, handle
