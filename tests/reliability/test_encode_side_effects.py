"""A plugin's encode may read the pipeline, not change it (``guard.py``).

One test template per kind of change: each makes its change to the pipeline inside ``encode`` and
then returns a valid kv cache. Every change is seen, undone where it can be, and the call is refused
with a ``PluginError`` naming the plugin and its distribution, before any denoising; afterwards the
pipeline is bit-identical to before (``pipeline_state``, which records everything the guard checks),
and a good call through the same ``TemplatePipeline`` is bit-equal to the same call made before.
A write into a tensor's memory cannot be undone (no copy is kept): it is refused and named as such.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import rel_support
import torch
from diffusers.hooks import HookRegistry, ModelHook
from dt_test_templates import TestKV

from diffusion_templates import PluginError, TemplatePipeline
from diffusion_templates.plugins import default_host
from diffusion_templates.testing.snapshot import pipeline_state, state_differences

FAMILY = "flux2_klein"
DISTRIBUTION = "dt-meddling"
SEEDS = (0, 1)


def _attention(pipe) -> torch.nn.Module:
    return pipe.transformer.transformer_blocks[0].attn


def _first_buffer(pipe) -> tuple[str, torch.Tensor]:
    for component in ("text_encoder", "vae", "transformer"):
        for name, tensor in getattr(pipe, component).named_buffers():
            if tensor.is_floating_point():
                return f"{component}.{name}", tensor
    raise AssertionError("the tiny pipeline has no floating buffer")


def _diffusers_hook(pipe) -> None:
    HookRegistry.check_if_exists_or_initialize(_attention(pipe)).register_hook(ModelHook(), "meddling")


def _raise_after_training(pipe) -> None:
    pipe.text_encoder.train()
    raise RuntimeError("boom after the change")


#: kind of change -> (what the encode does to the pipeline, what the error must say)
UNDOABLE: dict[str, tuple[Callable[[Any], Any], str]] = {
    "train() on the denoiser": (
        lambda p: p.transformer.train(),
        r"transformer and \d+ more: set training=True",
    ),
    "train() on one submodule": (lambda p: _attention(p).to_q.train(), r"attn\.to_q: set training=True"),
    "scheduler config": (
        lambda p: p.scheduler.register_to_config(shift=7.0),
        r"changed the config of 'scheduler' \(shift\)",
    ),
    "model config": (
        lambda p: p.transformer.register_to_config(num_layers=9),
        r"changed the config of 'transformer' \(num_layers\)",
    ),
    "scheduler replaced": (
        lambda p: setattr(p, "scheduler", copy.deepcopy(p.scheduler)),
        r"replaced component 'scheduler'",
    ),
    "vae replaced": (lambda p: setattr(p, "vae", copy.deepcopy(p.vae)), r"replaced component 'vae'"),
    "torch forward hook": (
        lambda p: p.text_encoder.register_forward_hook(lambda m, a, o: None),
        r"text_encoder: registered torch hooks",
    ),
    "torch forward pre-hook with kwargs": (
        lambda p: _attention(p).register_forward_pre_hook(lambda m, a, k: None, with_kwargs=True),
        r"attn: registered torch hooks",
    ),
    "global torch hook": (
        lambda p: torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: None),
        r"registered a global torch module hook",
    ),
    "diffusers hook": (_diffusers_hook, r"attn: registered diffusers hooks \['meddling'\]"),
    "attention processor": (
        lambda p: _attention(p).set_processor(type(_attention(p).processor)()),
        r"attn: swapped the attention processor",
    ),
    "forward monkeypatch": (
        lambda p: setattr(p.vae, "forward", lambda *a, **k: None),
        r"vae: replaced forward",
    ),
    "parameter replaced": (
        lambda p: setattr(_attention(p).to_q, "weight", torch.nn.Parameter(_attention(p).to_q.weight + 1)),
        r"attn\.to_q: replaced parameters \['weight'\]",
    ),
    "submodule replaced": (
        lambda p: setattr(p.transformer, "proj_out", copy.deepcopy(p.transformer.proj_out)),
        r"transformer: replaced modules \['proj_out'\]",
    ),
    "requires_grad flipped": (
        lambda p: p.vae.requires_grad_(False),
        r"vae\.\S+ and \d+ more: set requires_grad=False",
    ),
    "encode raises after a change": (_raise_after_training, r"text_encoder and \d+ more: set training=True"),
}


def _meddling(change: Callable[[Any], Any]) -> type:
    class Meddling(TestKV):
        """A valid kv template whose encode also changes the pipeline it was given."""

        def encode(self, inputs, context):
            change(context.pipe)
            return super().encode(inputs, context)

    return Meddling


def _register(name: str, change: Callable[[Any], Any]) -> None:
    default_host().register("template", name, _meddling(change), distribution=DISTRIBUTION)


def _call(tp: TemplatePipeline, seed: int, templates: list) -> torch.Tensor:
    return tp(**rel_support.call_kwargs(FAMILY, steps=1, seed=seed), templates=templates).images


GOOD = [{"template": "test-kv", "scale": 1.5, "seed": 3, "length": 2}]


@pytest.fixture(scope="module")
def pipe():
    return rel_support.build(FAMILY)


@pytest.fixture(scope="module")
def references(pipe):
    tp = TemplatePipeline(pipe, store=None)
    return {seed: _call(tp, seed, GOOD) for seed in SEEDS}


def _refused(tp: TemplatePipeline, name: str, match: str, seed: int) -> PluginError:
    denoiser_calls = []
    handle = tp.pipe.transformer.register_forward_pre_hook(lambda m, a: denoiser_calls.append(1))
    try:
        with pytest.raises(PluginError, match=match) as info:
            _call(tp, seed, [{"template": name, "seed": seed}])
    finally:
        handle.remove()
    assert denoiser_calls == [], "denoising started before the refusal"
    error = info.value
    assert error.plugin == name and error.distribution == DISTRIBUTION
    assert f"plugin {name!r} (distribution {DISTRIBUTION!r})" in str(error)
    assert "encode changed the pipeline" in str(error)
    return error


@pytest.mark.parametrize("kind", list(UNDOABLE))
def test_each_kind_of_change_is_undone_and_refused(pipe, references, kind, tally):
    change, match = UNDOABLE[kind]
    name = "meddle-" + kind.replace(" ", "-").replace("(", "").replace(")", "")
    _register(name, change)
    before = pipeline_state(pipe)
    tp = TemplatePipeline(pipe)  # with the default store: a refused encode must not be stored
    for seed in SEEDS:
        error = _refused(tp, name, match, seed)
        assert "NOT undone" not in str(error)
        assert state_differences(before, pipeline_state(pipe)) == []
        assert rel_support.global_state_problems() == []
        assert torch.equal(_call(tp, seed, GOOD), references[seed]), "the next good call differs"
    if kind == "encode raises after a change":
        assert isinstance(error.__cause__, PluginError) and "boom after the change" in str(error.__cause__)
    tally["encode_guard.refused_and_undone"] += len(SEEDS)


def test_an_encode_that_only_reads_the_pipeline_is_accepted(pipe, references):
    """Running the pipeline's text encoder and VAE (what templates do) is no change."""

    def read(p):
        with torch.no_grad():
            p.text_encoder(p.tokenizer("a blue square", return_tensors="pt").input_ids)
            p.vae.encode(torch.rand(1, 3, 32, 32)).latent_dist.mode()
            p.transformer.state_dict()

    _register("reader", read)
    before = pipeline_state(pipe)
    tp = TemplatePipeline(pipe, store=None)
    outputs = [
        _call(tp, seed, [{"template": "reader", "seed": 3, "scale": 1.5, "length": 2}]) for seed in SEEDS
    ]
    assert state_differences(before, pipeline_state(pipe)) == []
    for seed, output in zip(SEEDS, outputs, strict=True):
        assert torch.equal(output, references[seed]), "the reader's cache is test-kv's: same output"


@pytest.mark.parametrize("how", ["add", "value-preserving mul"])
def test_an_in_place_weight_or_buffer_write_is_refused_and_named_as_not_undone(how):
    pipe = rel_support.build(FAMILY)  # its own: the weight write stays
    weight = _attention(pipe).to_k.weight
    buffer_path, buffer = _first_buffer(pipe)

    def write(p):
        with torch.no_grad():
            if how == "add":
                weight.add_(1.0)
            else:
                weight.mul_(1.0)  # the same values, still a write
            buffer.mul_(1.0)

    _register("meddle-write", write)
    before = pipeline_state(pipe)
    tp = TemplatePipeline(pipe)
    error = _refused(tp, "meddle-write", r"NOT undone \(no copy of tensor memory is kept\)", seed=0)
    assert "transformer.transformer_blocks.0.attn.to_k.weight: written in place" in str(error)
    assert f"{buffer_path}: written in place" in str(error)
    diffs = state_differences(before, pipeline_state(pipe))
    if how == "add":
        assert diffs == ["transformer.tensor.transformer_blocks.0.attn.to_k.weight: tensor changed"]
    else:
        assert diffs == []


def test_snapshot_records_what_the_guard_checks():
    """``pipeline_state`` sees training flags, configs, components, requires_grad and global hooks."""
    pipe = rel_support.build(FAMILY)
    before = pipeline_state(pipe)
    changes = {
        "transformer.module.<root>: training changed": lambda: pipe.transformer.train(),
        "scheduler.config: changed": lambda: pipe.scheduler.register_to_config(shift=7.0),
        "vae.requires_grad: changed": lambda: pipe.vae.requires_grad_(False),
        "pipeline.components: changed": lambda: setattr(pipe, "scheduler", copy.deepcopy(pipe.scheduler)),
    }
    for expected, change in changes.items():
        change()
        diffs = state_differences(before, pipeline_state(pipe), limit=1000)
        assert any(d.startswith(expected) for d in diffs), (expected, diffs[:5])
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        assert "torch.global_hooks: changed" in state_differences(before, pipeline_state(pipe), limit=1000)
    finally:
        handle.remove()


def test_hooks_a_library_installs_on_first_use_are_no_change():
    """transformers 5 hooks a model's layers the first time hidden states are requested and keeps the
    hooks; an encode that is the first to ask (the edit template does) is accepted, and the hooks stay
    (removing them would leave the model marked as hooked but without hooks)."""
    from diffusion_templates.testing.tiny import TINY_PIPELINES

    pipe = TINY_PIPELINES[FAMILY].build()  # not warmed up: no hidden states asked for yet
    pipe.set_progress_bar_config(disable=True)
    encoder = pipe.text_encoder

    def marked() -> bool:
        return any(getattr(m, "_output_capturing_hooks_installed", False) for m in encoder.modules())

    assert not marked()

    def hidden_states(p):
        with torch.no_grad():
            out = p.text_encoder(
                p.tokenizer("a blue square", return_tensors="pt").input_ids, output_hidden_states=True
            )
        assert out.hidden_states is not None and len(out.hidden_states) > 1

    _register("hidden-states", hidden_states)
    tp = TemplatePipeline(pipe, store=None)
    for seed in SEEDS:
        _call(tp, seed, [{"template": "hidden-states", "seed": seed}])
    assert marked()
    assert any(m._forward_hooks for m in encoder.modules()), "transformers' own hooks were removed"
    hidden_states(pipe)  # and they still work
