"""The embedding carrier equals each pipeline called with hand-built prompt embeddings.

The reference shares no code with the carrier: the test calls the pipeline's ``encode_prompt``
itself, appends/adds the template tensors by hand and passes ``prompt_embeds`` (+ pooled, + masks,
+ the negative side) to the plain pipeline. CFG is on in every family.
"""

from __future__ import annotations

import contextlib
import warnings

import diffusers
import pytest
import torch

from diffusion_templates import CacheError, CarrierConflictError, TemplatePipeline, UnsupportedError
from diffusion_templates.carriers.embedding import EmbeddingCache, EmbeddingCarrier
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from diffusion_templates.testing.tiny import TINY_PIPELINES, tiny_call_kwargs
from helpers import count_denoiser_calls

FAMILIES = ["flux2_klein", "flux", "sd3", "qwen_image", "sdxl"]
PROMPT = "a red circle"
_PIPES: dict[str, object] = {}


def tiny(family):
    if family not in _PIPES:
        pipe = TINY_PIPELINES[family].build()
        pipe(prompt="warm up", **tiny_call_kwargs(family, cfg=True))
        _PIPES[family] = pipe
    return _PIPES[family]


def call_kwargs(family, cfg=True, **extra):
    kwargs = tiny_call_kwargs(family, cfg=cfg, output_type="latent")
    kwargs.update(extra)
    return kwargs


def caches_for(pipe, family, seed=0):
    """A positive cache (3 tokens, a delta on every token, a pooled delta where there is one) and a
    negative one (2 tokens)."""
    dims = TemplatePipeline(pipe).adapter.text_embedding_dims()
    g = torch.Generator().manual_seed(seed)
    pooled = torch.randn(1, dims[1], generator=g) * 0.1 if dims[1] else None
    positive = EmbeddingCache(
        tokens=torch.randn(1, 3, dims[0], generator=g),
        delta=torch.randn(1, 1, dims[0], generator=g) * 0.1,
        pooled_delta=pooled,
        template="pos",
    )
    negative = EmbeddingCache(tokens=torch.randn(1, 2, dims[0], generator=g), template="neg")
    return positive, negative


def pad_to(short, long):
    """Both halves equally long: repeat the shorter side's last token (the carrier's documented rule)."""
    missing = long.shape[1] - short.shape[1]
    return torch.cat([short, short[:, -1:].expand(-1, missing, -1)], dim=1) if missing > 0 else short


def apply(tokens, cache):
    tokens = tokens + cache.delta if cache.delta is not None else tokens
    return torch.cat([tokens, cache.tokens], dim=1) if cache.tokens is not None else tokens


@torch.no_grad()
def hand_built(pipe, family, positive, negative):
    """The reference call's embedding arguments, built with the pipeline's own encode_prompt."""
    if family == "flux2_klein":
        common = dict(max_sequence_length=32, text_encoder_out_layers=(1, 2))
        cond = pipe.encode_prompt(PROMPT, **common)[0]
        uncond = pipe.encode_prompt("", **common)[0]
        return dict(prompt_embeds=apply(cond, positive), negative_prompt_embeds=apply(uncond, negative))
    if family == "flux":
        cond, pooled, _ = pipe.encode_prompt(PROMPT, None, max_sequence_length=32)
        uncond, negative_pooled, _ = pipe.encode_prompt("", None, max_sequence_length=32)
        cond, uncond = apply(cond, positive), apply(uncond, negative)
        return dict(
            prompt_embeds=cond,
            pooled_prompt_embeds=pooled + positive.pooled_delta,
            negative_prompt_embeds=pad_to(uncond, cond),
            negative_pooled_prompt_embeds=negative_pooled,
        )
    if family == "qwen_image":
        cond, mask = pipe.encode_prompt(PROMPT, max_sequence_length=64)
        uncond, negative_mask = pipe.encode_prompt(" ", max_sequence_length=64)
        assert mask is None and negative_mask is None  # one prompt each: all tokens valid
        cond, uncond = apply(cond, positive), apply(uncond, negative)
        return dict(
            prompt_embeds=cond,
            prompt_embeds_mask=torch.ones(cond.shape[:2], dtype=torch.long),
            negative_prompt_embeds=uncond,
            negative_prompt_embeds_mask=torch.ones(uncond.shape[:2], dtype=torch.long),
        )
    if family == "sd3":
        cond, uncond, pooled, negative_pooled = pipe.encode_prompt(
            PROMPT, None, None, do_classifier_free_guidance=True, max_sequence_length=32
        )
    else:
        cond, uncond, pooled, negative_pooled = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=True)
    cond, uncond = apply(cond, positive), apply(uncond, negative)
    return dict(
        prompt_embeds=cond,
        pooled_prompt_embeds=pooled + positive.pooled_delta,
        negative_prompt_embeds=pad_to(uncond, cond),
        negative_pooled_prompt_embeds=negative_pooled,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_embedding_equals_hand_built_prompt_embeds(family):
    pipe = tiny(family)
    positive, negative = caches_for(pipe, family)
    before = pipeline_state(pipe)
    ours = TemplatePipeline(pipe)(
        prompt=PROMPT, templates=[positive], negative_templates=[negative], **call_kwargs(family)
    ).images
    assert_pipeline_unchanged(before, pipe)
    kwargs = call_kwargs(family)
    kwargs.pop("negative_prompt", None)  # the reference passes the negative embeddings instead
    reference = pipe(**hand_built(pipe, family, positive, negative), **kwargs).images
    assert (ours - reference).abs().max() < 1e-4
    plain = pipe(prompt=PROMPT, **call_kwargs(family)).images
    assert (ours - plain).abs().max() > 1e-3


def test_merge_concatenates_tokens_and_sums_deltas(flux2_pipe):
    g = torch.Generator().manual_seed(1)
    a = EmbeddingCache(
        tokens=torch.randn(1, 2, 32, generator=g), delta=torch.randn(1, 1, 32, generator=g), template="a"
    )
    b = EmbeddingCache(
        tokens=torch.randn(1, 1, 32, generator=g), delta=torch.randn(1, 1, 32, generator=g), template="b"
    )
    merged = EmbeddingCarrier().merge_caches([a, b])
    assert merged.template == "a+b"
    assert torch.equal(merged.tokens, torch.cat([a.tokens, b.tokens], dim=1))
    assert torch.equal(merged.delta, a.delta + b.delta)
    tp = TemplatePipeline(flux2_pipe)
    both = tp(prompt=PROMPT, templates=[a, b], **call_kwargs("flux2_klein")).images
    one = tp(prompt=PROMPT, templates=[merged], **call_kwargs("flux2_klein")).images
    assert torch.equal(both, one)


def test_merge_conflicts():
    carrier = EmbeddingCarrier()
    with pytest.raises(CarrierConflictError, match="disagree on the embedding dimension"):
        carrier.merge_caches(
            [EmbeddingCache(tokens=torch.zeros(1, 1, 8)), EmbeddingCache(tokens=torch.zeros(1, 1, 9))]
        )
    with pytest.raises(CarrierConflictError, match="different token counts"):
        carrier.merge_caches(
            [EmbeddingCache(delta=torch.zeros(1, 3, 8)), EmbeddingCache(delta=torch.zeros(1, 4, 8))]
        )


def test_per_token_delta_and_batched_prompts(flux2_pipe):
    """A delta over every token of the prompt; two prompts take a batch-1 cache each."""
    pipe = flux2_pipe
    common = dict(max_sequence_length=32, text_encoder_out_layers=(1, 2))
    with torch.no_grad():
        cond = pipe.encode_prompt([PROMPT, "a blue square"], **common)[0]
    delta = torch.randn(1, cond.shape[1], cond.shape[2], generator=torch.Generator().manual_seed(2))
    cache = EmbeddingCache(delta=delta, template="age")
    kwargs = call_kwargs("flux2_klein", cfg=False)
    ours = TemplatePipeline(pipe)(prompt=[PROMPT, "a blue square"], templates=[cache], **kwargs).images
    reference = pipe(prompt_embeds=cond + delta, **call_kwargs("flux2_klein", cfg=False)).images
    assert ours.shape[0] == 2 and (ours - reference).abs().max() < 1e-4


def test_negative_without_cfg_warns(flux2_pipe):
    _, negative = caches_for(flux2_pipe, "flux2_klein")
    with pytest.warns(UserWarning) as record:
        out = TemplatePipeline(flux2_pipe)(
            prompt=PROMPT, negative_templates=[negative], **call_kwargs("flux2_klein", cfg=False)
        ).images
    messages = [str(w.message) for w in record]
    assert any("template 'neg' has no effect" in m and "guidance_scale > 1" in m for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = flux2_pipe(prompt=PROMPT, **call_kwargs("flux2_klein", cfg=False)).images
    assert torch.equal(out, plain)


def test_cache_round_trip(tmp_path):
    cache = EmbeddingCache(delta=torch.randn(1, 1, 8), template="age")
    cache.save(tmp_path / "age.safetensors")
    loaded = EmbeddingCache.load(tmp_path / "age.safetensors")
    assert torch.equal(loaded.delta, cache.delta) and loaded.tokens is None and loaded.template == "age"


def test_cache_validation():
    with pytest.raises(ValueError, match="set tokens, delta or pooled_delta"):
        EmbeddingCache()
    with pytest.raises(ValueError, match=r"tokens must be \(B, L, D\)"):
        EmbeddingCache(tokens=torch.zeros(3, 8))


# --------------------------------------------------------------------------- bad inputs


@contextlib.contextmanager
def guarded(pipe):
    before = pipeline_state(pipe)
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    calls, handle = count_denoiser_calls(denoiser)
    try:
        yield TemplatePipeline(pipe)
    finally:
        handle.remove()
    assert calls == [], "denoising started before the error"
    assert_pipeline_unchanged(before, pipe)


def test_wrong_dimension(flux2_pipe):
    cache = EmbeddingCache(tokens=torch.zeros(1, 2, 7), template="style")
    with (
        guarded(flux2_pipe) as tp,
        pytest.raises(
            CacheError, match=r"template 'style': tokens have dimension 7, 'flux2' prompt embeddings have 32"
        ),
    ):
        tp(prompt=PROMPT, templates=[cache], **call_kwargs("flux2_klein"))


def test_pooled_delta_without_pooled_embedding(flux2_pipe):
    cache = EmbeddingCache(pooled_delta=torch.zeros(1, 32), template="slider")
    with (
        guarded(flux2_pipe) as tp,
        pytest.raises(
            CacheError,
            match=r"template 'slider' has a pooled_delta, but 'flux2' has no pooled prompt embedding",
        ),
    ):
        tp(prompt=PROMPT, templates=[cache], **call_kwargs("flux2_klein"))


def test_per_token_delta_of_the_wrong_length(flux2_pipe):
    cache = EmbeddingCache(delta=torch.zeros(1, 5, 32), template="age")
    with (
        guarded(flux2_pipe) as tp,
        pytest.raises(
            CacheError, match=r"template 'age': delta covers 5 tokens, the prompt embeddings have 32"
        ),
    ):
        tp(prompt=PROMPT, templates=[cache], **call_kwargs("flux2_klein"))


def test_qwen_tokens_beyond_max_sequence_length():
    pipe = tiny("qwen_image")
    cache = EmbeddingCache(tokens=torch.zeros(1, 60, 16), template="long")
    with (
        guarded(pipe) as tp,
        pytest.raises(CacheError, match=r"template 'long'.*exceed max_sequence_length=64"),
    ):
        tp(prompt=PROMPT, templates=[cache], **call_kwargs("qwen_image"))


def test_unsupported_pipeline(flux2_pipe):
    parts = {
        k: flux2_pipe.components[k] for k in ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")
    }
    dev = diffusers.Flux2Pipeline(**parts)
    cache = EmbeddingCache(tokens=torch.zeros(1, 2, 32), template="style")
    with pytest.raises(UnsupportedError, match=r"template 'style': embedding drives Flux2KleinPipeline"):
        TemplatePipeline(dev)(prompt=PROMPT, templates=[cache], num_inference_steps=2)
