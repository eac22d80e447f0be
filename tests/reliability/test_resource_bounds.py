"""Resource bounds: a template set whose merged K/V length or LoRA rank is too large is refused up front.

``DT_MAX_KV_TOKENS`` (default 16384 extra tokens per attention layer) and ``DT_MAX_LORA_RANK``
(default 1024 per module) are read at call time, after merging (several templates add up), per CFG
branch. The refusal is a ``CacheError`` with the numbers, raised before denoising starts; the
pipeline is unchanged and the next call works.
"""

from __future__ import annotations

import pytest
import torch

from diffusion_templates import CacheError, PluginError, TemplatePipeline
from diffusion_templates.limits import DEFAULT_MAX_KV_TOKENS, DEFAULT_MAX_LORA_RANK
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from helpers import count_denoiser_calls, run

TARGET = "transformer_blocks.0.attn.to_q"


@pytest.fixture
def guarded(flux2_pipe, monkeypatch):
    """A TemplatePipeline; afterwards: no denoising ran, the pipeline is unchanged."""
    monkeypatch.delenv("DT_MAX_KV_TOKENS", raising=False)
    monkeypatch.delenv("DT_MAX_LORA_RANK", raising=False)
    before = pipeline_state(flux2_pipe)
    calls, handle = count_denoiser_calls(flux2_pipe.transformer)
    try:
        yield TemplatePipeline(flux2_pipe, store=None)
    finally:
        handle.remove()
    assert calls == [], "denoising started before the refusal"
    assert_pipeline_unchanged(before, flux2_pipe)


def kv(length: int, seed: int = 0, layers=("double_0",)) -> dict:
    return {"template": "test-kv", "length": length, "seed": seed, "layers": list(layers)}


def lora(rank: int, seed: int = 0) -> dict:
    return {"template": "test-lora", "targets": [TARGET], "rank": rank, "seed": seed}


def test_defaults():
    assert (DEFAULT_MAX_KV_TOKENS, DEFAULT_MAX_LORA_RANK) == (16384, 1024)


def test_merged_kv_length_over_the_default_bound(guarded, tally):
    # test-kv allows 4096 tokens per template: five of them merge to 20480 on one layer
    templates = [kv(4096, seed) for seed in range(5)]
    with pytest.raises(
        CacheError, match=r"layer 'double_0': 20480 extra tokens, more than the limit of 16384"
    ):
        run(guarded, "flux2_klein", templates=templates)
    tally["bounds.refused"] += 1


def test_merged_lora_rank_over_the_default_bound(guarded, tally):
    # test-lora allows rank 64: seventeen on one module merge to rank 1088
    with pytest.raises(CacheError, match=rf"module '{TARGET}': rank 1088, more than the limit of 1024"):
        run(guarded, "flux2_klein", negative_templates=[lora(64, seed) for seed in range(17)])
    tally["bounds.refused"] += 1


@pytest.mark.parametrize("branch", ["templates", "negative_templates"])
def test_bounds_are_read_at_call_time(guarded, monkeypatch, branch, tally):
    monkeypatch.setenv("DT_MAX_KV_TOKENS", "5")
    with pytest.raises(
        CacheError, match=r"6 extra tokens, more than the limit of 5 per layer \(DT_MAX_KV_TOKENS\)"
    ):
        run(guarded, "flux2_klein", **{branch: [kv(3, 0), kv(3, 1)]})
    monkeypatch.setenv("DT_MAX_LORA_RANK", "8")
    with pytest.raises(
        CacheError, match=r"rank 12, more than the limit of 8 per module \(DT_MAX_LORA_RANK\)"
    ):
        run(guarded, "flux2_klein", **{branch: [lora(4, 0), lora(4, 1), lora(4, 2)]})
    tally["bounds.refused"] += 2


def test_within_the_bounds_runs(flux2_pipe, monkeypatch):
    monkeypatch.setenv("DT_MAX_KV_TOKENS", "6")
    monkeypatch.setenv("DT_MAX_LORA_RANK", "8")
    tp = TemplatePipeline(flux2_pipe, store=None)
    bare = run(flux2_pipe, "flux2_klein")
    out = run(tp, "flux2_klein", templates=[kv(3, 0), kv(3, 1), lora(4, 0), lora(4, 1)])
    assert not torch.equal(out, bare)


def test_a_bad_bound_names_the_variable(guarded, monkeypatch):
    monkeypatch.setenv("DT_MAX_LORA_RANK", "-1")
    with pytest.raises(PluginError, match=r"DT_MAX_LORA_RANK='-1': expected a positive integer"):
        run(guarded, "flux2_klein", templates=[lora(4)])
