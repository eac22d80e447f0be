"""Bad input is a clear error naming template and field, raised before denoising; nothing changes."""

from __future__ import annotations

import pytest

from diffusion_templates import (
    CacheError,
    KVCache,
    PluginError,
    TemplateInputError,
    TemplatePipeline,
    UnknownTemplateError,
)
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from helpers import count_denoiser_calls, run


@pytest.fixture
def guarded(flux2_pipe):
    """Yields a TemplatePipeline; afterwards asserts no denoising ran and the pipeline is unchanged."""
    before = pipeline_state(flux2_pipe)
    calls, handle = count_denoiser_calls(flux2_pipe.transformer)
    try:
        yield TemplatePipeline(flux2_pipe)
    finally:
        handle.remove()
    assert calls == [], "denoising started before the error"
    assert_pipeline_unchanged(before, flux2_pipe)


def test_unknown_template_lists_available(guarded):
    with pytest.raises(UnknownTemplateError, match=r"no template named 'nosuch'.*test-kv"):
        run(guarded, "flux2_klein", templates=[{"template": "nosuch"}])


def test_invalid_field_names_template_and_field(guarded):
    with pytest.raises(TemplateInputError) as info:
        run(guarded, "flux2_klein", templates=[{"template": "test-kv", "scale": 99}])
    message = str(info.value)
    assert "'test-kv'" in message and "'scale'" in message and "less than or equal to 4" in message
    assert info.value.errors[0][0] == "scale"


def test_unknown_field_is_rejected(guarded):
    with pytest.raises(TemplateInputError, match="'colour'.*Extra inputs are not permitted"):
        run(guarded, "flux2_klein", templates=[{"template": "test-kv", "colour": "red"}])


def test_spec_without_template_name(guarded):
    with pytest.raises(TemplateInputError, match="needs a 'template' name"):
        run(guarded, "flux2_klein", templates=[{"scale": 1.0}])


def test_kv_head_dim_mismatch(guarded):
    with pytest.raises(
        CacheError, match=r"layer 'double_0': \(heads, head_dim\) is \(2, 7\).*expects \(2, 16\)"
    ):
        run(guarded, "flux2_klein", templates=[{"template": "test-kv", "head_dim": 7}])


def test_kv_unknown_layer_names(guarded):
    with pytest.raises(CacheError, match=r"layers \['double_9'\].*does not have"):
        run(guarded, "flux2_klein", templates=[{"template": "test-kv", "layers": ["double_0", "double_9"]}])


def test_lora_target_missing(guarded):
    with pytest.raises(CacheError, match="targets 'transformer_blocks.7.attn.to_q'"):
        run(
            guarded,
            "flux2_klein",
            negative_templates=[{"template": "test-lora", "targets": ["transformer_blocks.7.attn.to_q"]}],
        )


def test_error_in_a_later_template_leaves_nothing_applied(guarded):
    with pytest.raises(TemplateInputError):
        run(guarded, "flux2_klein", templates=[{"template": "test-kv"}, {"template": "test-lora", "rank": 0}])


@pytest.mark.parametrize(
    "fail_in,match",
    [
        ("encode", "hook 'encode' raised RuntimeError: boom in encode"),
        ("to_cache", "hook 'to_cache' raised RuntimeError: boom in to_cache"),
        ("type", "must return TemplateCache objects, returned dict"),
    ],
)
def test_plugin_failures_name_plugin_and_distribution(guarded, fail_in, match):
    with pytest.raises(PluginError, match=match) as info:
        run(guarded, "flux2_klein", templates=[{"template": "test-flaky", "fail_in": fail_in}])
    assert "test-flaky" in str(info.value)


def test_cache_for_another_backbone_size(guarded):
    import torch

    cache = KVCache(
        keys={"double_0": torch.zeros(1, 2, 3, 16)}, values={"double_0": torch.zeros(1, 2, 3, 16)}
    )
    with pytest.raises(CacheError, match=r"\(3, 16\)"):
        run(guarded, "flux2_klein", templates=[cache])
