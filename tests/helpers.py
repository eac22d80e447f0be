"""Small helpers shared by the host tests."""

from __future__ import annotations

import contextlib

import torch

from diffusion_templates.testing.tiny import tiny_call_kwargs


def run(pipe_or_tp, family: str, *, cfg: bool = True, output_type: str = "latent", seed: int = 0, **kwargs):
    """One fast deterministic call; returns the output images/latents tensor-or-array."""
    call = tiny_call_kwargs(family, cfg=cfg, output_type=output_type, seed=seed)
    call.update(kwargs)
    call.setdefault("prompt", "a red circle")
    return pipe_or_tp(**call).images


def reference_attention(query, key, value):
    """softmax(q k^T / sqrt(d)) v written out, in diffusers' (B, L, heads, head_dim) layout."""
    q, k, v = (t.transpose(1, 2).float() for t in (query, key, value))
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return (weights @ v).transpose(1, 2).to(query.dtype)


@contextlib.contextmanager
def hand_written_kv(monkeypatch, transformer, modules, cache, layers):
    """A reference for the kv carrier that shares none of its code.

    Forward pre-hooks on each attention module record which layer is running; the attention
    function the transformer module imported is replaced by :func:`reference_attention` over the
    keys/values with the cache's tensors concatenated at the end of the sequence.
    """
    current: list[str | None] = [None]
    handles = []
    for name, layer in layers.items():
        handles.append(layer.module.register_forward_pre_hook(lambda m, a, n=name: current.__setitem__(0, n)))
        handles.append(layer.module.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))

    def dispatch(query, key, value, attn_mask=None, **_):
        assert attn_mask is None
        name = current[0]
        if name in cache.keys:
            k = cache.keys[name].to(key.dtype).expand(key.shape[0], -1, -1, -1)
            v = cache.values[name].to(value.dtype).expand(value.shape[0], -1, -1, -1)
            key, value = torch.cat([key, k], dim=1), torch.cat([value, v], dim=1)
        return reference_attention(query, key, value)

    for module in modules:
        monkeypatch.setattr(module, "dispatch_attention_fn", dispatch)
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
