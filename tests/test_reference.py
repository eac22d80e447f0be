"""Reference-image K/V capture (``reference.py``): equal to what diffusers' Flux2KleinKVPipeline extracts.

The KV pipeline's first denoising step runs ``[reference, noisy]`` tokens through the transformer in
``kv_cache_mode="extract"`` and stores every layer's post-RoPE reference K/V in a ``Flux2KVCache``
(cleared when the call ends). The tests read that cache right after the extract step and compare it
with the host's capture, which runs the reference tokens alone.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinKVPipeline
from PIL import Image

from diffusion_templates import KVCache, TemplatePipeline, UnsupportedError
from diffusion_templates.attention import installed_points
from diffusion_templates.errors import CacheError
from diffusion_templates.reference import (
    UNSUPPORTED,
    capture_attention_kv,
    capture_reference_kv,
    prepare_reference_image,
    reference_tokens,
    unsupported_reason,
)
from diffusion_templates.testing.snapshot import pipeline_state, state_differences
from diffusion_templates.testing.tiny import build_flux, build_flux2_klein, tiny_call_kwargs


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8))


def _kv_pipeline(dtype: torch.dtype = torch.float32) -> Flux2KleinKVPipeline:
    # Its own build (same seed, so the same weights): the KV pipeline swaps the transformer's processors.
    pipe = Flux2KleinKVPipeline(**build_flux2_klein(is_distilled=True, dtype=dtype).components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _extracted(kv_pipe: Flux2KleinKVPipeline, images, **call) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run the KV pipeline and return its Flux2KVCache as stored by the extract step (copied before the
    pipeline clears it), keyed by the adapter's layer names."""
    transformer = kv_pipe.transformer
    original = transformer.forward
    stored: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        if kwargs.get("kv_cache_mode") == "extract":
            cache = out[1]
            groups = (("double", cache.double_block_caches), ("single", cache.single_block_caches))
            for group, caches in groups:
                for i, layer in enumerate(caches):
                    k, v = layer.get()
                    stored[f"{group}_{i}"] = (k.clone(), v.clone())
        return out

    transformer.forward = forward
    try:
        kwargs = tiny_call_kwargs("flux2_klein", steps=2, output_type="latent")
        kwargs.pop("guidance_scale")  # the KV pipeline has no CFG
        kwargs.update(call)
        kv_pipe(image=images, prompt="a red circle", **kwargs)
    finally:
        del transformer.forward
    assert stored, "the KV pipeline ran no extract step"
    return stored


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.double() - b.double()).abs().max())


# --------------------------------------------------------------------------- FLUX.2: the KV pipeline


@pytest.mark.parametrize("size", [(64, 64), (80, 72)], ids=["64x64", "80x72-cropped"])
def test_flux2_capture_equals_kv_pipeline_extract(size):
    """Same K/V (post-RoPE, every layer) as Flux2KleinKVPipeline's Flux2KVCache after its extract step."""
    image = _picture(*size)
    expected = _extracted(_kv_pipeline(), image)
    tp = TemplatePipeline(build_flux2_klein(is_distilled=True))
    cache = capture_reference_kv(tp.adapter, image)
    assert set(cache.keys) == set(expected) == set(tp.adapter.attention_layers())
    layer = tp.adapter.attention_layers()["double_0"]
    tokens = (size[0] // 16) * (size[1] // 16)  # centre-cropped to multiples of 16 px
    for name, (k, v) in expected.items():
        assert cache.keys[name].shape == (1, tokens, layer.heads, layer.head_dim)
        assert _max_diff(cache.keys[name], k) < 1e-5, name
        assert _max_diff(cache.values[name], v) < 1e-5, name


def test_flux2_capture_equals_kv_pipeline_extract_in_bfloat16():
    image = _picture(64, 64)
    expected = _extracted(_kv_pipeline(torch.bfloat16), image)
    tp = TemplatePipeline(build_flux2_klein(is_distilled=True, dtype=torch.bfloat16))
    cache = capture_reference_kv(tp.adapter, image)
    for name, (k, v) in expected.items():
        assert cache.keys[name].dtype == torch.bfloat16
        assert torch.equal(cache.keys[name], k) and torch.equal(cache.values[name], v), name


def test_flux2_large_picture_is_resized_like_the_kv_pipeline():
    """Above 1024x1024 px both resize to that area (PIL Lanczos) and crop to multiples of 16."""
    image = _picture(1100, 1000, seed=3)
    expected = _extracted(_kv_pipeline(), image, height=64, width=64)
    tp = TemplatePipeline(build_flux2_klein(is_distilled=True))
    cache = capture_reference_kv(tp.adapter, image)
    for name, (k, v) in expected.items():
        assert _max_diff(cache.keys[name], k) < 1e-5 and _max_diff(cache.values[name], v) < 1e-5, name


def test_flux2_reference_slots_follow_the_kv_pipeline_positions():
    """``index=i`` puts the picture at the i-th reference's time offset, T = 10 + 10 i.

    With two pictures the KV pipeline's reference tokens attend to each other, so only the first
    layer's K/V (computed before any attention) are per picture: there the second picture's tokens
    must equal a capture with ``index=1``.
    """
    first, second = _picture(64, 64, seed=1), _picture(64, 64, seed=2)
    expected = _extracted(_kv_pipeline(), [first, second])
    tp = TemplatePipeline(build_flux2_klein(is_distilled=True))
    tokens = reference_tokens(tp.adapter, second, index=1)
    assert torch.all(tokens.ids[..., 0] == 20)
    cache = capture_reference_kv(tp.adapter, second, index=1)
    k, v = expected["double_0"]
    n = tokens.length
    assert _max_diff(cache.keys["double_0"], k[:, n:]) < 1e-5
    assert _max_diff(cache.values["double_0"], v[:, n:]) < 1e-5
    slot0 = capture_reference_kv(tp.adapter, second, index=0)
    assert _max_diff(slot0.keys["double_0"], k[:, n:]) > 1e-3  # positions matter (RoPE on the T axis)
    assert torch.equal(slot0.values["double_0"], cache.values["double_0"])  # values carry no position


def test_picture_forms_agree():
    """PIL image, uint8 array and [0, 1] tensor give the same K/V."""
    image = _picture(64, 64, seed=4)
    tp = TemplatePipeline(build_flux2_klein())
    from_pil = capture_reference_kv(tp.adapter, image)
    array = np.array(image)
    from_array = capture_reference_kv(tp.adapter, array)
    from_tensor = capture_reference_kv(tp.adapter, torch.from_numpy(array).permute(2, 0, 1).float() / 255)
    for name in from_pil.keys:
        assert torch.equal(from_pil.keys[name], from_array.keys[name])
        assert torch.equal(from_pil.values[name], from_tensor.values[name])


def test_bad_pictures_are_refused():
    tp = TemplatePipeline(build_flux2_klein())
    with pytest.raises(CacheError, match="at least 64"):
        capture_reference_kv(tp.adapter, _picture(48, 64))
    with pytest.raises(CacheError, match="aspect ratio"):
        capture_reference_kv(tp.adapter, _picture(600, 64))
    with pytest.raises(CacheError, match="values must lie in"):
        capture_reference_kv(tp.adapter, torch.full((1, 3, 64, 64), 2.0))
    with pytest.raises(CacheError, match="one reference image"):
        capture_reference_kv(tp.adapter, torch.zeros(2, 3, 64, 64))


# --------------------------------------------------------------------------- FLUX.1


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FLUX's rotary embedding on (B, L, H, D): pairs (x0, x1) rotated, written out."""
    x_real, x_imag = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos[None, :, None] + rotated * sin[None, :, None]).to(x.dtype)


def test_flux1_capture_is_the_first_layers_post_rope_kv():
    """FLUX.1: first double layer's K/V recomputed by hand from the module weights.

    Reference tokens: Kontext's encoding (VAE mode, (z - shift) * scale, 2x2 packed) and ids with the
    first axis 1; timestep 0; pooled embedding of the empty prompt; guidance 3.5 (FluxPipeline's default).
    """
    pipe = build_flux()
    tp = TemplatePipeline(pipe)
    image = _picture(64, 96, seed=5)
    cache = capture_reference_kv(tp.adapter, image)
    ref = reference_tokens(tp.adapter, image)
    assert ref.ids.shape == (ref.length, 3) and torch.all(ref.ids[:, 0] == 1)
    assert torch.all(reference_tokens(tp.adapter, image, index=2).ids[:, 0] == 3)
    transformer = pipe.transformer
    with torch.no_grad():
        pooled = pipe._get_clip_prompt_embeds(prompt="", device="cpu")
        temb = transformer.time_text_embed(torch.zeros(1), torch.full((1,), 3.5 * 1000), pooled)
        hidden = transformer.x_embedder(ref.tokens)
        block = transformer.transformer_blocks[0]
        normed, *_ = block.norm1(hidden, emb=temb)
        attn = block.attn
        key = attn.norm_k(attn.to_k(normed).unflatten(-1, (attn.heads, -1)))
        value = attn.to_v(normed).unflatten(-1, (attn.heads, -1))
        cos, sin = transformer.pos_embed(ref.ids)
        key = _rope(key, cos, sin)
    assert cache.keys["double_0"].shape == (1, ref.length, attn.heads, attn.head_dim)
    assert _max_diff(cache.keys["double_0"], key) < 1e-5
    assert _max_diff(cache.values["double_0"], value) < 1e-5
    assert set(cache.keys) == set(tp.adapter.attention_layers())


# --------------------------------------------------------------------------- restoration, isolation


@pytest.mark.parametrize("build", [build_flux2_klein, build_flux], ids=["flux2", "flux"])
def test_capture_leaves_the_pipeline_bit_identical(build):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    pipe = build()
    family = "flux2_klein" if build is build_flux2_klein else "flux"
    before_out = pipe(prompt="a cat", **tiny_call_kwargs(family, output_type="latent")).images
    before, backends = pipeline_state(pipe), dict(_AttentionBackendRegistry._backends)
    tp = TemplatePipeline(pipe)
    capture_reference_kv(tp.adapter, _picture(64, 64))

    def boom():
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        capture_attention_kv(tp.adapter, boom)
    assert state_differences(before, pipeline_state(pipe)) == []
    assert dict(_AttentionBackendRegistry._backends) == backends
    after_out = pipe(prompt="a cat", **tiny_call_kwargs(family, output_type="latent")).images
    assert torch.equal(before_out, after_out)


def test_other_threads_pass_through_the_capture_hooks():
    """A bare denoiser call from another thread during a capture records nothing and computes as usual."""
    pipe = build_flux2_klein()
    tp = TemplatePipeline(pipe)
    ref = reference_tokens(tp.adapter, _picture(64, 64))
    text = torch.zeros(1, 3, pipe.transformer.config.joint_attention_dim)

    def call():
        return pipe.transformer(
            hidden_states=ref.tokens,
            encoder_hidden_states=text,
            timestep=torch.full((1,), 0.5),
            img_ids=ref.ids,
            txt_ids=torch.zeros(1, 3, 4),
            return_dict=False,
        )[0]

    with torch.no_grad():
        expected = call()
    result = {}

    def run():
        thread = threading.Thread(target=lambda: result.setdefault("out", call()))
        thread.start()
        thread.join()

    records = capture_attention_kv(tp.adapter, run)
    assert all(calls == [] for calls in records.values())
    assert torch.equal(result["out"], expected)


def test_capture_kv_sees_each_attention_call_once():
    pipe = build_flux2_klein()
    tp = TemplatePipeline(pipe)
    records = capture_attention_kv(
        tp.adapter, lambda: pipe(prompt="a cat", **tiny_call_kwargs("flux2_klein", steps=2, cfg=True))
    )
    # 2 steps x 2 CFG branches, one attention call per layer each; text + image tokens
    assert all(len(calls) == 4 for calls in records.values())
    key, _ = records["single_1"][0]
    assert key.shape[1] == 32 + 16  # max_sequence_length 32 text tokens + 4x4 image tokens
    # afterwards nothing stays attached: a later call records nothing more
    assert installed_points() == []
    pipe(prompt="a cat", **tiny_call_kwargs("flux2_klein", steps=1))
    assert all(len(calls) == 4 for calls in records.values())


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("family", ["sd3", "qwen_image", "sdxl"])
def test_other_backbones_are_refused_with_reasons(tiny_pipes, family):
    tp = TemplatePipeline(tiny_pipes(family))
    reason = unsupported_reason(tp.adapter.name)
    assert reason == UNSUPPORTED[tp.adapter.name] and len(reason) > 60
    with pytest.raises(UnsupportedError, match=tp.adapter.name):
        capture_reference_kv(tp.adapter, _picture(64, 64))
    with pytest.raises(UnsupportedError):
        reference_tokens(tp.adapter, _picture(64, 64))


def test_prepared_picture_is_channels_last_in_unit_range():
    tp = TemplatePipeline(build_flux2_klein())
    picture = prepare_reference_image(tp.adapter, _picture(72, 64))
    assert picture.shape == (1, 3, 64, 64)
    assert picture.is_contiguous(memory_format=torch.channels_last)
    assert picture.min() >= -1 and picture.max() <= 1


def test_capture_is_a_kv_cache_the_carrier_accepts():
    tp = TemplatePipeline(build_flux2_klein())
    cache = capture_reference_kv(tp.adapter, _picture(64, 64), template="ref")
    assert isinstance(cache, KVCache) and cache.template == "ref"
    assert tp.prepare([cache])
