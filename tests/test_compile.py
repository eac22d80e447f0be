"""Templates over torch.compile'd denoisers (CPU inductor): same outputs as eager, no recompiles for a new
template of the same K/V length, bare compiled calls unchanged, the pipeline restored exactly.

Three ways of compiling: ``pipe.transformer.compile()``, ``pipe.transformer = torch.compile(...)``
(an ``OptimizedModule``: the adapter works on the module inside) and diffusers'
``compile_repeated_blocks()``. Each test builds its own tiny pipeline (compiling changes the module)
and resets dynamo around it. Inductor compiles the whole-model cases that compare numbers with
eager; the other ways use dynamo with the ``aot_eager`` backend (the same tracing, guards and
recompiles, a fraction of the compile time).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from diffusion_templates import TemplatePipeline
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from diffusion_templates.testing.tiny import TINY_PIPELINES, tiny_call_kwargs


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _call(pipe_or_tp, family: str, seed: int = 0, **kwargs) -> torch.Tensor:
    call = tiny_call_kwargs(family, cfg=True, size=32, seed=seed, output_type="latent")
    return pipe_or_tp(prompt="a red circle", **call, **kwargs).images


def _kv(seed: int, length: int = 4) -> dict:
    return {"template": "test-kv", "scale": 1.2, "length": length, "seed": seed}


def _frames() -> int:
    return counters["frames"]["ok"]


def _breaks() -> int:
    return sum(counters["graph_break"].values())


def _check_compiled(family: str, compile_it) -> None:
    pipe = TINY_PIPELINES[family].build()
    tp = TemplatePipeline(pipe)
    specs = [_kv(1), _kv(2)]  # two templates of one K/V length
    eager = [_call(tp, family, seed=i, templates=[s]) for i, s in enumerate(specs)]
    compile_it(pipe)
    tp = TemplatePipeline(pipe)
    bare = _call(pipe, family)
    before = pipeline_state(pipe)

    first = _call(tp, family, seed=0, templates=[specs[0]])
    frames, breaks = _frames(), _breaks()
    second = _call(tp, family, seed=1, templates=[specs[1]])
    assert _frames() == frames, "another template of the same K/V length recompiled"
    assert _breaks() == breaks
    for ours, reference in zip((first, second), eager, strict=True):
        assert (ours - reference).abs().max() <= 1e-4
    assert (first - bare).abs().max() > 1e-3  # the K/V reached the compiled model

    assert torch.equal(_call(pipe, family), bare)  # bare compiled output unchanged after templated calls
    assert _frames() == frames, "a bare call after templated calls recompiled"
    assert_pipeline_unchanged(before, pipe)


@pytest.mark.parametrize("family", ["flux2_klein", "sd3"])
def test_module_compile(family):
    _check_compiled(family, lambda pipe: pipe.transformer.compile())


@pytest.mark.parametrize("family", ["flux2_klein", "sd3"])
def test_torch_compile_wrapper(family):
    def wrap(pipe):
        pipe.transformer = torch.compile(pipe.transformer, backend="aot_eager")

    _check_compiled(family, wrap)


def test_compile_repeated_blocks_flux2():
    _check_compiled("flux2_klein", lambda pipe: pipe.transformer.compile_repeated_blocks(backend="aot_eager"))


def test_repeated_blocks_compile_once_per_block_class_not_per_block():
    """Every block of a class shares the wrapper's code (the point travels in ``backend``): the first
    kv call compiles one graph per block class and CFG branch, however many blocks there are."""
    pipe = TINY_PIPELINES["flux2_klein"].build()
    transformer = pipe.transformer
    assert len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks) > 2
    transformer.compile_repeated_blocks(backend="aot_eager")
    tp = TemplatePipeline(pipe)
    _call(pipe, "flux2_klein")
    frames = _frames()
    _call(tp, "flux2_klein", templates=[_kv(4)])
    assert _frames() - frames <= len(transformer._repeated_blocks) * 2


def test_kv_call_adds_at_most_the_branch_trackers_graph_break():
    """The attention points add no graph break: dynamo traces the wrapper processors. The one break
    of a templated call on a whole-model compile is the CFG branch tracker's ContextVar read at the
    top of the denoiser (``injection.py``)."""
    pipe = TINY_PIPELINES["flux2_klein"].build()
    pipe.transformer.compile(backend="aot_eager")
    tp = TemplatePipeline(pipe)
    _call(pipe, "flux2_klein")
    assert _breaks() == 0
    _call(tp, "flux2_klein", templates=[_kv(3)])
    assert _breaks() <= 1
    assert all("ContextVar" in reason for reason in counters["graph_break"])
