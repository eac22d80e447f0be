"""Per-module attention points: K/V reach each targeted module's own attention call, nothing else.

The kv carrier swaps each targeted attention module's processor for a wrapper running diffusers' own
processor code with the attention function bound to an injecting one (``attention.py``). These tests
pin, on every family: the K/V of one CFG branch reach exactly that branch's rows/calls (against a
hand-written reference sharing none of the code), processors the host cannot see through are refused
before denoising, patches other libraries made stay in place and keep being used, and everything is
put back exactly.
"""

from __future__ import annotations

import contextlib
import inspect
import types

import diffusers.models.transformers.transformer_flux as transformer_flux
import diffusers.models.transformers.transformer_flux2 as transformer_flux2
import diffusers.models.transformers.transformer_qwenimage as transformer_qwenimage
import pytest
import torch
from diffusers.models import attention_processor
from diffusers.models.attention_dispatch import _AttentionBackendRegistry

from diffusion_templates import TemplatePipeline
from diffusion_templates.attention import PROCESSORS, installed_points, processor_of
from diffusion_templates.errors import UnsupportedError
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from helpers import FAMILIES, _extend, count_denoiser_calls, reference_attention, run

DISPATCH_MODULES = [transformer_flux2, transformer_flux, transformer_qwenimage]
BATCHED = {"sd3", "sdxl"}  # [uncond, cond] in one denoiser batch; the others call once per branch


@contextlib.contextmanager
def branch_reference(monkeypatch, denoiser, family, cache, layers, branch):
    """Attention written out, with the cache's K/V appended for the rows of ``branch`` only.

    Batched CFG: the second half of the batch is "cond", the first "uncond". Sequential CFG (the
    pipelines call the conditional branch first, then the unconditional one, at every step): even
    denoiser calls are "cond".
    """
    state = {"call": -1, "layer": None}
    handles = [denoiser.register_forward_pre_hook(lambda m, a: state.__setitem__("call", state["call"] + 1))]
    for name, layer in layers.items():
        module = layer.module
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: state.__setitem__("layer", n)))
        handles.append(module.register_forward_hook(lambda m, a, o: state.__setitem__("layer", None)))

    def attention(query, key, value, mask):  # (B, L, H, D)
        name = state["layer"]
        if family in BATCHED:
            n = query.shape[0] // 2
            rows = slice(n, None) if branch == "cond" else slice(0, n)
            out = reference_attention(query, key, value, mask).clone()
            part_mask = mask[rows] if mask is not None and mask.shape[0] == query.shape[0] else mask
            k, v, m = _extend(key[rows], value[rows], part_mask, cache, name)
            out[rows] = reference_attention(query[rows], k, v, m)
            return out
        if (state["call"] % 2 == 0) == (branch == "cond"):
            key, value, mask = _extend(key, value, mask, cache, name)
        return reference_attention(query, key, value, mask)

    def dispatch(query, key, value, attn_mask=None, **_):
        return attention(query, key, value, attn_mask)

    class Functional:
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        def scaled_dot_product_attention(self, query, key, value, attn_mask=None, **_):
            out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask)
            return out.transpose(1, 2)

    for module in DISPATCH_MODULES:
        monkeypatch.setattr(module, "dispatch_attention_fn", dispatch)
    monkeypatch.setattr(attention_processor, "F", Functional())
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        monkeypatch.undo()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("branch", ["cond", "uncond"])
def test_one_branch_kv_equals_hand_written_reference(family, branch, tiny_pipes, monkeypatch):
    pipe = tiny_pipes(family)
    tp = TemplatePipeline(pipe)
    images = {"num_images_per_prompt": 2} if family in BATCHED else {}
    for seed in (0, 3):
        spec = {"template": "test-kv", "scale": 1.3, "length": 3 + seed, "seed": seed}
        cache = tp.encode(spec)[0]
        key = "templates" if branch == "cond" else "negative_templates"
        ours = run(tp, family, seed=seed, **{key: [spec]}, **images)
        layers = tp.adapter.attention_layers()
        with branch_reference(monkeypatch, tp.adapter.denoiser, family, cache, layers, branch):
            reference = run(pipe, family, seed=seed, **images)
        assert (ours - reference).abs().max() < 1e-5
        assert (ours - run(pipe, family, seed=seed, **images)).abs().max() > 1e-4  # the K/V had an effect


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapper_keeps_the_processor_signature_and_class(family, tiny_pipes):
    pipe = tiny_pipes(family)
    tp = TemplatePipeline(pipe)
    layers = tp.adapter.attention_layers()
    name, layer = next(iter(layers.items()))
    original = layer.module.processor
    seen = {}

    def callback(pipe_, step, timestep, tensors):
        wrapper = layer.module.processor
        seen["wrapped"] = wrapper is not original
        seen["signature"] = inspect.signature(wrapper.__call__) == inspect.signature(original.__call__)
        seen["isinstance"] = isinstance(wrapper, type(original))
        seen["original"] = processor_of(layer.module) is original
        return tensors

    run(tp, family, templates=[{"template": "test-kv", "layers": [name]}], callback_on_step_end=callback)
    assert seen == {"wrapped": True, "signature": True, "isinstance": True, "original": True}
    assert layer.module.processor is original
    assert installed_points() == []


class Delegating:
    """A custom processor the host cannot see through (it hands the call to another processor)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return self.inner(attn, hidden_states, *args, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_processor_is_refused_before_denoising(family):
    from diffusion_templates.testing.tiny import TINY_PIPELINES

    pipe = TINY_PIPELINES[family].build()  # its own copy: the processor is changed for good
    tp = TemplatePipeline(pipe)
    layers = tp.adapter.attention_layers()
    names = list(layers)
    custom, other = names[1], names[0]
    layers[custom].module.set_processor(Delegating(layers[custom].module.processor))
    run(pipe, family)
    before = pipeline_state(pipe)
    calls, handle = count_denoiser_calls(tp.adapter.denoiser)
    try:
        with pytest.raises(UnsupportedError, match=rf"test-kv.*{custom}.*Delegating"):
            run(tp, family, templates=[{"template": "test-kv", "layers": [other, custom]}])
        assert calls == []  # stopped before the pipeline ran
        # a cache leaving that layer out is fine
        assert run(tp, family, templates=[{"template": "test-kv", "layers": [other]}]).shape
    finally:
        handle.remove()
    assert_pipeline_unchanged(before, pipe)
    assert installed_points() == []


def test_legacy_attn_processor_is_refused_on_sdxl():
    from diffusers.models.attention_processor import AttnProcessor

    from diffusion_templates.testing.tiny import TINY_PIPELINES

    pipe = TINY_PIPELINES["sdxl"].build()
    pipe.unet.set_attn_processor(AttnProcessor())  # non-2.0: calls no F.scaled_dot_product_attention
    tp = TemplatePipeline(pipe)
    first = next(iter(tp.adapter.attention_layers()))
    with pytest.raises(UnsupportedError, match=rf"{first}.*AttnProcessor\b"):
        run(tp, "sdxl", templates=[{"template": "test-kv"}])
    assert AttnProcessor not in PROCESSORS


@pytest.mark.parametrize("family", FAMILIES)
def test_foreign_patches_stay_and_keep_being_used(family, tiny_pipes, monkeypatch):
    """A wrapped backend in diffusers' registry and a proxy on ``attention_processor.F``, installed
    by another library before the call, are still in place afterwards and ran during the call."""
    pipe = tiny_pipes(family)
    tp = TemplatePipeline(pipe)
    spec = {"template": "test-kv", "length": 4, "seed": 2}
    expected = run(tp, family, templates=[spec])
    used = {"backend": 0, "sdpa": 0}
    backends = _AttentionBackendRegistry._backends
    name = _AttentionBackendRegistry._active_backend
    original_backend = backends[name]

    def foreign_backend(*args, **kwargs):
        used["backend"] += 1
        return original_backend(*args, **kwargs)

    class ForeignF(types.ModuleType):
        def __getattr__(self, attr):
            return getattr(torch.nn.functional, attr)

        def scaled_dot_product_attention(self, *args, **kwargs):
            used["sdpa"] += 1
            return torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)

    proxy = ForeignF("foreign_functional")
    monkeypatch.setitem(backends, name, foreign_backend)
    monkeypatch.setattr(attention_processor, "F", proxy)
    ours = run(tp, family, templates=[spec])
    assert backends[name] is foreign_backend and attention_processor.F is proxy
    assert used["sdpa" if family in BATCHED else "backend"] > 0
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_restoration_and_nothing_process_wide(family, tiny_pipes):
    pipe = tiny_pipes(family)
    bare = run(pipe, family)
    before = pipeline_state(pipe)
    backends = dict(_AttentionBackendRegistry._backends)
    tp = TemplatePipeline(pipe)
    seen = []

    def callback(pipe_, step, timestep, tensors):  # during the call: nothing of diffusers' replaced
        untouched = _AttentionBackendRegistry._backends == backends
        seen.append(attention_processor.F is torch.nn.functional and untouched)
        return tensors

    for seed in (0, 1):
        spec = {"template": "test-kv", "length": 2 + seed, "seed": seed}
        run(tp, family, templates=[spec], negative_templates=[spec], callback_on_step_end=callback)
        assert_pipeline_unchanged(before, pipe)
    assert seen and all(seen)
    assert installed_points() == []
    assert torch.equal(run(pipe, family), bare)
