"""``TemplatePipeline.injecting``: templates for direct denoiser calls (training, custom samplers)."""

from __future__ import annotations

import pytest
import torch

from diffusion_templates import KVCache, TemplatePipeline
from diffusion_templates.context import CURRENT_CALL
from diffusion_templates.errors import UnsupportedError
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state


def denoise(pipe, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """One direct transformer call on random 8x8-token latents, as a training loop makes it."""
    gen = torch.Generator().manual_seed(seed)
    transformer = pipe.transformer
    latents = torch.randn(batch, transformer.config.in_channels, 4, 4, generator=gen)
    text = torch.randn(batch, 6, transformer.config.joint_attention_dim, generator=gen)
    return transformer(
        hidden_states=pipe._pack_latents(latents),
        encoder_hidden_states=text,
        timestep=torch.full((batch,), 0.5),
        img_ids=pipe._prepare_latent_ids(latents),
        txt_ids=pipe._prepare_text_ids(text),
        guidance=None,
        return_dict=False,
    )[0]


def kv_cache(tp: TemplatePipeline, *, requires_grad: bool, batch: int = 1) -> tuple[KVCache, torch.Tensor]:
    layer = tp.adapter.attention_layers()["double_0"]
    source = torch.randn(batch, 3, layer.heads, layer.head_dim, generator=torch.Generator().manual_seed(1))
    source.requires_grad_(requires_grad)
    # Built from ``source`` by differentiable operations, as a Template model's forward would.
    cache = KVCache(keys={"double_0": source * 2}, values={"double_0": source + 1}, template="grad")
    return cache, source


def test_gradients_reach_the_cache_tensors(flux2_pipe):
    tp = TemplatePipeline(flux2_pipe)
    before = pipeline_state(flux2_pipe)
    bare = denoise(flux2_pipe)
    cache, source = kv_cache(tp, requires_grad=True, batch=2)
    with tp.injecting(templates=[cache]) as call:
        assert CURRENT_CALL.get() is call
        out = denoise(flux2_pipe)
        out.square().mean().backward()
    assert CURRENT_CALL.get() is None
    assert not torch.allclose(out, bare)  # the cache was seen
    assert source.grad is not None and source.grad.abs().sum() > 0
    # Outside the block the denoiser is back to itself, bit for bit.
    assert torch.equal(denoise(flux2_pipe), bare)
    assert_pipeline_unchanged(before, flux2_pipe)


def test_matches_a_pipeline_call_and_negative_templates_stay_out(flux2_pipe):
    tp = TemplatePipeline(flux2_pipe)
    cache, _ = kv_cache(tp, requires_grad=False)
    with torch.no_grad():
        with tp.injecting(templates=[cache]):
            positive = denoise(flux2_pipe)
        with tp.injecting(negative_templates=[cache]):  # outside cache_context("uncond"): no effect
            negative = denoise(flux2_pipe)
        bare = denoise(flux2_pipe)
    assert not torch.equal(positive, bare)
    assert torch.equal(negative, bare)


def test_undone_when_the_block_raises(flux2_pipe):
    tp = TemplatePipeline(flux2_pipe)
    before = pipeline_state(flux2_pipe)
    cache, _ = kv_cache(tp, requires_grad=False)
    with pytest.raises(RuntimeError, match="boom"):
        with tp.injecting(templates=[cache]):
            denoise(flux2_pipe)
            raise RuntimeError("boom")
    assert CURRENT_CALL.get() is None
    assert_pipeline_unchanged(before, flux2_pipe)


def test_bad_cache_fails_before_anything_is_patched(flux2_pipe):
    tp = TemplatePipeline(flux2_pipe)
    before = pipeline_state(flux2_pipe)
    bad = KVCache(keys={"nope": torch.zeros(1, 1, 2, 16)}, values={"nope": torch.zeros(1, 1, 2, 16)})
    with pytest.raises(Exception, match="nope"):
        with tp.injecting(templates=[bad]):
            pytest.fail("the block must not run")
    assert_pipeline_unchanged(before, flux2_pipe)


def test_carriers_that_need_the_pipeline_call_are_refused(flux2_pipe):
    from diffusion_templates.carriers.embedding import EmbeddingCache

    tp = TemplatePipeline(flux2_pipe)
    before = pipeline_state(flux2_pipe)
    dim = flux2_pipe.transformer.config.joint_attention_dim
    cache = EmbeddingCache(tokens=torch.zeros(1, 2, dim), template="tokens")
    with pytest.raises(UnsupportedError, match="injecting"):
        with tp.injecting(templates=[cache], call_kwargs={"prompt": "x"}):
            pytest.fail("the block must not run")
    assert_pipeline_unchanged(before, flux2_pipe)
