"""The kit on a correct template: the companion, registered in code, passes on every tiny backbone.

This runs the battery in-process on all five tiny backbones (FLUX.2 klein, FLUX.1, SD3, Qwen-Image,
SDXL; sequential and batched CFG) with both of the companion's carriers.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusion_templates import TemplateModel

from dt_sdk.companion import CompanionTemplate
from dt_sdk.conformance import (
    MISSING,
    TINY_BACKBONES,
    TemplateConformance,
    cache_differences,
    caches_equal,
    describe_state_differences,
)


class TinyModel(TemplateModel):
    @register_to_config
    def __init__(self, width: int = 4):
        super().__init__()
        self.proj = torch.nn.Linear(width, width)


class UnsafeModel(TinyModel):
    @classmethod
    def from_pretrained(cls, path, **kwargs):  # BUG: skips the host's refusal of code and pickles
        return ModelMixin.from_pretrained.__func__(cls, path, **kwargs)


class TestCompanionKV(TemplateConformance):
    template = "companion-under-test"
    plugin = CompanionTemplate
    model_class = TinyModel
    model_kwargs = {"width": 3}
    valid_inputs = [{"carrier": "kv", "tokens": 3}, {"carrier": "lora"}, {}]
    invalid_inputs = [
        {"carrier": "residual"},
        {"tokens": 0},
        ({"tokens": "many"}, "tokens"),
        ({"seed": MISSING, "colour": "red"}, "colour"),
    ]


class TestCompanionLora(TemplateConformance):
    template = "companion-under-test"
    plugin = CompanionTemplate
    backbones = ("flux2", "sd3")  # sequential and batched CFG
    valid_inputs = {"carrier": "lora", "seed": 3}
    invalid_inputs = [{"carrier": 1}]


class UnsafeModelConformance(TemplateConformance):
    template = "companion-under-test"
    plugin = CompanionTemplate
    model_class = UnsafeModel


@pytest.mark.parametrize(("test", "message"), [
    ("test_model_refuses_folder_with_code", "UnsafeModel.from_pretrained loaded a folder containing"),
    ("test_model_refuses_pickled_weights", "UnsafeModel.from_pretrained loaded pickled weights"),
])
def test_unsafe_model_loading_is_caught(tmp_path, test, message):
    with pytest.raises(pytest.fail.Exception, match=message):
        getattr(UnsafeModelConformance(), test)(tmp_path)


def test_backbones_cover_the_tiny_pipelines():
    assert TestCompanionKV()._backbones_to_test() == list(TINY_BACKBONES)


def test_cache_differences_name_what_changed():
    from diffusion_templates import KVCache

    keys = {"double_0": torch.zeros(1, 2, 2, 4)}
    a = KVCache(keys=keys, values=keys, template="a")
    assert caches_equal(a, a.model_copy())
    b = KVCache(keys={"double_0": torch.zeros(1, 2, 2, 4, dtype=torch.float64)}, values=keys, template="b")
    diffs = cache_differences(a, b)
    assert "field 'template' changed: 'a' -> 'b'" in diffs
    assert "tensor 'keys/double_0' dtype torch.float32 became torch.float64" in diffs
    c = KVCache(keys={"double_0": -torch.zeros(1, 2, 2, 4)}, values=keys, template="a")
    # -0.0 == 0.0 as numbers, but not bit for bit
    assert cache_differences(a, c) == ["tensor 'keys/double_0' values changed"]


def test_state_differences_are_worded(tiny_pipeline):
    from diffusion_templates.testing.snapshot import pipeline_state

    pipe = tiny_pipeline("flux2")
    before = pipeline_state(pipe)
    attn = pipe.transformer.transformer_blocks[0].attn
    handle = attn.register_forward_pre_hook(lambda module, args: None)
    attn.forward = attn.forward
    try:
        diffs = describe_state_differences(before, pipeline_state(pipe))
    finally:
        handle.remove()
        del attn.forward
    key = "transformer.module.transformer_blocks.0.attn"
    forward = "forward changed (instance `forward` attribute added: a diffusers hook was not cleaned up)"
    assert f"{key}: {forward}" in diffs
    assert any(d.startswith(f"{key}: torch hooks changed (_forward_pre_hooks: 0 -> 1)") for d in diffs), diffs
    assert describe_state_differences(before, pipeline_state(pipe)) == []


@pytest.mark.parametrize("backbone", ["flux", "sdxl"])
def test_tiny_pipeline_fixture_builds_fresh_pipelines(tiny_pipeline, backbone):
    assert tiny_pipeline(backbone) is not tiny_pipeline(backbone)
