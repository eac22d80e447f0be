"""The kv carrier appends template K/V after RoPE, exactly like a hand-written concatenation."""

from __future__ import annotations

import diffusers.models.transformers.transformer_flux as transformer_flux
import diffusers.models.transformers.transformer_flux2 as transformer_flux2
import diffusers.models.transformers.transformer_qwenimage as transformer_qwenimage
import pytest
import torch

from diffusion_templates import TemplatePipeline
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from diffusion_templates.testing.tiny import TINY_PIPELINES
from helpers import FAMILIES, hand_written_kv, run

# The transformer modules whose imported ``dispatch_attention_fn`` the reference replaces
# (SD3 and the UNet go through attention_processor's F.scaled_dot_product_attention instead).
DISPATCH_MODULES = [transformer_flux2, transformer_flux, transformer_qwenimage]


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_equals_hand_written_concatenation(family, tiny_pipes, monkeypatch):
    pipe = tiny_pipes(family)
    tp = TemplatePipeline(pipe)
    spec = {"template": "test-kv", "scale": 0.8, "length": 5}
    cache = tp.encode(spec)[0]
    ours = run(tp, family, templates=[spec])
    with hand_written_kv(
        monkeypatch, tp.adapter.denoiser, DISPATCH_MODULES, cache, tp.adapter.attention_layers()
    ):
        # The reference applies to both CFG branches; so must ours: inject as positive and negative.
        reference = run(pipe, family)
    both = run(tp, family, templates=[spec], negative_templates=[spec])
    assert (both - reference).abs().max() < 1e-5
    assert (ours - both).abs().max() > 1e-4  # the positive-only call really differs


@pytest.mark.parametrize("family", FAMILIES)
def test_no_template_is_bit_identical_to_bare(family, tiny_pipes):
    pipe = tiny_pipes(family)
    bare = run(pipe, family)
    before = pipeline_state(pipe)
    tp = TemplatePipeline(pipe)
    assert torch.equal(run(tp, family), bare)
    assert torch.equal(run(tp, family, templates=[]), bare)
    run(tp, family, templates=[{"template": "test-kv"}])
    assert torch.equal(run(pipe, family), bare)
    assert_pipeline_unchanged(before, pipe)


def test_kv_subset_of_layers_and_attention_backends_restored(flux2_pipe, monkeypatch):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    backends = dict(_AttentionBackendRegistry._backends)
    tp = TemplatePipeline(flux2_pipe)
    spec = {"template": "test-kv", "layers": ["double_1", "single_0"], "length": 2}
    cache = tp.encode(spec)[0]
    assert sorted(cache.keys) == ["double_1", "single_0"]
    ours = run(tp, "flux2_klein", templates=[spec], negative_templates=[spec])
    with hand_written_kv(
        monkeypatch, flux2_pipe.transformer, DISPATCH_MODULES, cache, tp.adapter.attention_layers()
    ):
        reference = run(flux2_pipe, "flux2_klein")
    assert (ours - reference).abs().max() < 1e-5
    assert _AttentionBackendRegistry._backends == backends


def test_batch_one_cache_applies_to_every_image(flux2_pipe, monkeypatch):
    tp = TemplatePipeline(flux2_pipe)
    spec = {"template": "test-kv", "length": 4}
    cache = tp.encode(spec)[0]
    kwargs = dict(prompt=["a red circle", "a blue square"], num_images_per_prompt=2)
    ours = run(tp, "flux2_klein", templates=[spec], negative_templates=[spec], **kwargs)
    assert ours.shape[0] == 4
    with hand_written_kv(
        monkeypatch, flux2_pipe.transformer, DISPATCH_MODULES, cache, tp.adapter.attention_layers()
    ):
        reference = run(flux2_pipe, "flux2_klein", **kwargs)
    assert (ours - reference).abs().max() < 1e-5


def test_bfloat16_pipeline_gets_cache_cast_to_layer_dtype():
    pipe = TINY_PIPELINES["flux2_klein"].build(dtype=torch.bfloat16)
    run(pipe, "flux2_klein")
    before = pipeline_state(pipe)
    tp = TemplatePipeline(pipe)
    cache = tp.encode({"template": "test-kv"})[0]
    assert cache.keys["double_0"].dtype == torch.float32
    out = run(tp, "flux2_klein", templates=[cache])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert not torch.equal(out, run(pipe, "flux2_klein"))
    assert_pipeline_unchanged(before, pipe)
