"""Concurrent calls: every result equals the same call made alone, bit for bit.

Per-call template state lives in the call (``CallState`` behind the ``CURRENT_CALL`` context
variable; each extra K/V an attention point holds names its ``CallState``), never in shared module
state; the hooks and processor wrappers that a call installs on shared modules act only inside that
call. Threads run a random mix of template sets (none, kv, lora, both; on the conditional or the
unconditional branch; two seeds):

(a) 8 threads share one ``TemplatePipeline``;
(b) 8 threads each wrap their own ``from_pipe`` pipeline (same modules, same weights);
(c) bare calls of the pipeline (each thread with its own ``from_pipe`` copy, scheduler and
    tokenizer: diffusers' own per-call state) run while templated calls inject into the same
    denoiser.

Afterwards the pipeline and the process-wide state are as before.
"""

from __future__ import annotations

import copy
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import rel_support
import torch

from diffusion_templates import TemplatePipeline
from diffusion_templates.testing.snapshot import pipeline_state, state_differences

FAMILY = "flux2_klein"
THREADS = 8
CALLS_PER_THREAD = rel_support.scaled(25)
SEEDS = (0, 1)


def _template_sets(linears: list[str]) -> dict[str, list[dict[str, Any]]]:
    kv = {"template": "test-kv", "scale": 1.5, "seed": 5, "length": 3}
    lora = {"template": "test-lora", "targets": linears[:2], "rank": 4, "seed": 9}
    return {"none": [], "kv": [kv], "lora": [lora], "both": [kv, lora]}


def _configs(linears: list[str]) -> list[tuple[str, str, int]]:
    """(template set, branch, seed) for every distinct call."""
    out = []
    for name in _template_sets(linears):
        for branch in ("cond",) if name == "none" else ("cond", "uncond"):
            out += [(name, branch, seed) for seed in SEEDS]
    return out


def _call(pipe_or_tp, linears: list[str], config: tuple[str, str, int]) -> torch.Tensor:
    name, branch, seed = config
    kwargs = rel_support.call_kwargs(FAMILY, steps=1, seed=seed)
    if isinstance(pipe_or_tp, TemplatePipeline):
        key = "templates" if branch == "cond" else "negative_templates"
        kwargs[key] = _template_sets(linears)[name]
    return pipe_or_tp(**kwargs).images


@pytest.fixture(scope="module")
def setup():
    pipe = rel_support.build(FAMILY)
    tp = TemplatePipeline(pipe)
    linears = rel_support.attention_linears(tp.adapter.denoiser)
    references = {config: _call(tp, linears, config) for config in _configs(linears)}
    bare = {seed: _call(pipe, linears, ("none", "cond", seed)) for seed in SEEDS}
    for seed in SEEDS:
        assert torch.equal(bare[seed], references[("none", "cond", seed)])
    return pipe, tp, linears, references, pipeline_state(pipe)


def _own_pipeline(pipe):
    """A pipeline sharing ``pipe``'s modules, with its own scheduler and tokenizer (diffusers' per-call
    state: a scheduler keeps its step index, a fast tokenizer its padding settings)."""
    own = type(pipe).from_pipe(
        pipe, scheduler=copy.deepcopy(pipe.scheduler), tokenizer=copy.deepcopy(pipe.tokenizer)
    )
    own.set_progress_bar_config(disable=True)
    return own


def _run_threads(worker, threads: int = THREADS) -> list[str]:
    start = threading.Barrier(threads)

    def run(index: int) -> list[str]:
        with rel_support.single_torch_thread():
            start.wait()
            return worker(index)

    with ThreadPoolExecutor(threads) as pool:
        return [problem for problems in pool.map(run, range(threads)) for problem in problems]


def _check_at_rest(pipe, baseline) -> None:
    assert state_differences(baseline, pipeline_state(pipe)) == []
    assert rel_support.global_state_problems() == []


def test_threads_sharing_one_template_pipeline(setup, tally):
    pipe, tp, linears, references, baseline = setup
    configs = list(references)

    def worker(index: int) -> list[str]:
        rng, problems = random.Random(100 + index), []
        for i in range(CALLS_PER_THREAD):
            config = rng.choice(configs)
            if not torch.equal(_call(tp, linears, config), references[config]):
                problems.append(f"thread {index} call {i} {config}")
        return problems

    problems = _run_threads(worker)
    tally["concurrency.shared_template_pipeline"] += THREADS * CALLS_PER_THREAD
    assert problems == [], f"{len(problems)} results differ from the same call made alone: {problems[:5]}"
    _check_at_rest(pipe, baseline)


def test_threads_with_pipelines_from_pipe(setup, tally):
    pipe, _, linears, references, baseline = setup
    configs = list(references)

    def worker(index: int) -> list[str]:
        own = type(pipe).from_pipe(pipe)  # shares every component, the scheduler included
        own.set_progress_bar_config(disable=True)
        tp = TemplatePipeline(own)
        rng, problems = random.Random(200 + index), []
        for i in range(CALLS_PER_THREAD):
            config = rng.choice(configs)
            if not torch.equal(_call(tp, linears, config), references[config]):
                problems.append(f"thread {index} call {i} {config}")
        return problems

    problems = _run_threads(worker)
    tally["concurrency.from_pipe_pipelines"] += THREADS * CALLS_PER_THREAD
    assert problems == [], f"{len(problems)} results differ from the same call made alone: {problems[:5]}"
    _check_at_rest(pipe, baseline)


def test_bare_calls_beside_templated_calls_on_the_same_modules(setup, tally):
    pipe, tp, linears, references, baseline = setup
    configs = [c for c in references if c[0] != "none"]
    bare_threads = 2

    def worker(index: int) -> list[str]:
        rng, problems = random.Random(300 + index), []
        own = _own_pipeline(pipe) if index < bare_threads else None
        for i in range(CALLS_PER_THREAD):
            if own is not None:
                config = ("none", "cond", rng.choice(SEEDS))
                out = _call(own, linears, config)
            else:
                config = rng.choice(configs)
                out = _call(tp, linears, config)
            if not torch.equal(out, references[config]):
                problems.append(f"thread {index} ({'bare' if own else 'templated'}) call {i} {config}")
        return problems

    problems = _run_threads(worker)
    tally["concurrency.bare_beside_templated"] += THREADS * CALLS_PER_THREAD
    assert problems == [], f"{len(problems)} results differ from the same call made alone: {problems[:5]}"
    _check_at_rest(pipe, baseline)


def test_a_bare_call_entering_cache_context_in_another_thread_does_not_move_our_branch(setup):
    """Deterministic version of the race (c) could hit before the branch hook kept diffusers' cache
    context per thread: a bare call in thread B enters ``transformer.cache_context("cond")`` while
    thread A's templated call computes its uncond branch."""
    pipe, tp, linears, references, baseline = setup
    transformer = pipe.transformer
    entered, leave, threads = threading.Event(), threading.Event(), []

    def bare_call_enters_context(module, args):
        entered.clear()
        leave.clear()

        def bare() -> None:
            with transformer.cache_context("cond"):
                entered.set()
                leave.wait(10)

        thread = threading.Thread(target=bare)
        thread.start()
        threads.append(thread)
        entered.wait(10)

    def bare_call_leaves(module, args, output):
        leave.set()
        threads[-1].join(10)

    handles = [
        transformer.register_forward_pre_hook(bare_call_enters_context),
        transformer.register_forward_hook(bare_call_leaves),
    ]
    try:
        config = ("kv", "uncond", 0)
        out = _call(tp, linears, config)
    finally:
        for handle in handles:
            handle.remove()
    _check_at_rest(pipe, baseline)
    assert torch.equal(out, references[config]), "the negative templates missed their branch"
