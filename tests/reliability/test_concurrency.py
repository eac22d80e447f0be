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
from typing import Any

import pytest
import rel_support
import torch

from diffusion_templates import TemplatePipeline
from diffusion_templates.locks import component_lock, pipeline_components, stateful_components
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


def _own_pipeline(pipe, **replaced):
    """A pipeline sharing ``pipe``'s modules, with its own scheduler and tokenizers (diffusers' per-call
    state: a scheduler keeps its step index, a fast tokenizer its padding settings): the recipe of
    docs/reliability.md for bare calls beside templated ones. ``replaced``: further own components."""
    own_state = {
        name: copy.deepcopy(component)
        for name, component in pipeline_components(pipe).items()
        if not isinstance(component, torch.nn.Module)
    }
    own = type(pipe).from_pipe(pipe, **own_state, **replaced)
    own.set_progress_bar_config(disable=True)
    return own


#: The test's own guard against a deadlock or a hang (threads are daemons: a stuck one cannot block
#: the session). Not a timing assertion: a loaded CI machine runs these in seconds to a minute.
JOIN_TIMEOUT_S = 900


def _run_threads(worker, threads: int = THREADS) -> list[str]:
    start = threading.Barrier(threads)
    results: dict[int, list[str]] = {}

    def run(index: int) -> None:
        with rel_support.single_torch_thread():
            start.wait()
            try:
                results[index] = worker(index)
            except BaseException as exc:  # reported below, with the thread's number
                results[index] = [f"thread {index} raised {type(exc).__name__}: {exc}"]

    pool = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(JOIN_TIMEOUT_S)
    stuck = [i for i, thread in enumerate(pool) if thread.is_alive()]
    assert not stuck, f"threads {stuck} did not finish within {JOIN_TIMEOUT_S} s (deadlock?)"
    return [problem for index in range(threads) for problem in results[index]]


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


# --------------------------------------------------------------------------- every carrier beside bare calls

ALL_FAMILY = "flux"  # the one tiny family whose adapter supports all seven host carriers
ALL_SIZE = 32
ALL_THREADS = 6
ALL_BARE_THREADS = 2
ALL_CALLS_PER_THREAD = rel_support.scaled(8)


def _all_carrier_sets(tp: TemplatePipeline) -> dict[str, list]:
    """One template set per host carrier (ready caches, seeded), kv and lora through test templates."""
    from diffusion_templates.carriers.embedding import EmbeddingCache
    from diffusion_templates.carriers.guidance import GuidanceCache
    from diffusion_templates.carriers.init_latents import InitLatentsCache
    from diffusion_templates.carriers.latent_mask import LatentMaskCache
    from diffusion_templates.carriers.residual import ResidualCache

    adapter = tp.adapter
    generator = torch.Generator().manual_seed(11)
    token_dim, pooled_dim = adapter.text_embedding_dims()
    image = torch.rand(1, 3, ALL_SIZE, ALL_SIZE, generator=generator)
    mask = torch.zeros(1, 1, ALL_SIZE, ALL_SIZE)
    mask[..., ALL_SIZE // 2 :] = 1.0
    residual_shape = adapter.residual_shape("double", 0, ALL_SIZE, ALL_SIZE)
    linears = rel_support.attention_linears(adapter.denoiser)
    return {
        "kv": [{"template": "test-kv", "scale": 1.5, "seed": 5, "length": 3}],
        "lora": [{"template": "test-lora", "targets": linears[:2], "rank": 4, "seed": 9}],
        "embedding": [
            EmbeddingCache(
                delta=0.5 * torch.randn(1, 1, token_dim, generator=generator),
                pooled_delta=0.5 * torch.randn(1, pooled_dim, generator=generator),
            )
        ],
        "latent_mask": [LatentMaskCache(mask=mask, image=image)],
        "init_latents": [InitLatentsCache(strength=0.75, image=image)],
        "guidance": [GuidanceCache.single(kind="luminance", target=0.8, strength=1.0)],
        "residual": [
            ResidualCache.from_residuals({"double": [torch.randn(1, *residual_shape, generator=generator)]})
        ],
    }


def _all_call(pipe_or_tp, seed: int, templates: list | None = None) -> torch.Tensor:
    kwargs = rel_support.call_kwargs(ALL_FAMILY, steps=2, size=ALL_SIZE, seed=seed)
    if templates is not None:
        kwargs["templates"] = templates
    return pipe_or_tp(**kwargs).images


def test_every_carrier_beside_bare_calls_on_the_same_modules(tally):
    """Templated calls of every carrier on one TemplatePipeline; bare calls of ``from_pipe`` copies with
    their own scheduler and tokenizers in other threads. The guidance and residual hooks acted on those
    bare calls before they checked ``CallState.active``."""
    pipe = rel_support.build(ALL_FAMILY)
    tp = TemplatePipeline(pipe)
    sets = _all_carrier_sets(tp)
    references = {(name, seed): _all_call(tp, seed, sets[name]) for name in sets for seed in SEEDS}
    bare = {seed: _all_call(pipe, seed) for seed in SEEDS}
    for name in sets:  # each carrier changes the result, so a hook acting on a bare call would show
        assert not torch.equal(references[(name, 0)], bare[0]), f"{name} has no effect"
    baseline = pipeline_state(pipe)
    configs = list(references)

    def worker(index: int) -> list[str]:
        rng, problems = random.Random(400 + index), []
        own = _own_pipeline(pipe) if index < ALL_BARE_THREADS else None
        for i in range(ALL_CALLS_PER_THREAD):
            if own is not None:
                seed = rng.choice(SEEDS)
                if not torch.equal(_all_call(own, seed), bare[seed]):
                    problems.append(f"thread {index} (bare) call {i} seed {seed}")
            else:
                name, seed = config = configs[(index + i) % len(configs)]
                if not torch.equal(_all_call(tp, seed, sets[name]), references[config]):
                    problems.append(f"thread {index} (templated) call {i} {config}")
        return problems

    problems = _run_threads(worker, ALL_THREADS)
    tally["concurrency.every_carrier_beside_bare"] += ALL_THREADS * ALL_CALLS_PER_THREAD
    assert problems == [], f"{len(problems)} results differ from the same call made alone: {problems[:5]}"
    _check_at_rest(pipe, baseline)


# ------------------------------------------------------------------------ pipelines sharing only a scheduler


def test_the_lock_covers_every_stateful_component():
    """The denoiser, the VAE, the scheduler and the tokenizers are locked; text encoders are not."""
    pipe = rel_support.build(FAMILY)
    tp = TemplatePipeline(pipe)
    locked = {id(c) for c in stateful_components(pipe, tp.adapter.denoiser)}
    for name in ("transformer", "vae", "scheduler", "tokenizer"):
        assert id(getattr(pipe, name)) in locked, name
    assert id(pipe.text_encoder) not in locked
    other = _own_pipeline(pipe, transformer=copy.deepcopy(pipe.transformer), vae=copy.deepcopy(pipe.vae))
    other.scheduler = pipe.scheduler  # from here on the two share exactly the scheduler
    shared = set(map(id, stateful_components(pipe, pipe.transformer)))
    shared &= set(map(id, stateful_components(other, other.transformer)))
    assert shared == {id(pipe.scheduler)}
    assert component_lock(pipe.scheduler) is component_lock(other.scheduler)


def test_pipelines_sharing_only_the_scheduler_are_serialised(tally):
    """Two ``from_pipe`` pipelines with their own denoiser, VAE and tokenizer and one scheduler: the
    scheduler's step index is per call, so their calls must not interleave (with a lock keyed on the
    denoiser alone, none of such calls came out right)."""
    pipe = rel_support.build(FAMILY)
    other = _own_pipeline(pipe, transformer=copy.deepcopy(pipe.transformer), vae=copy.deepcopy(pipe.vae))
    other.scheduler = pipe.scheduler
    pipes = [TemplatePipeline(pipe), TemplatePipeline(other)]
    linears = rel_support.attention_linears(pipe.transformer)
    configs = _configs(linears)
    references = {config: _call(pipes[0], linears, config) for config in configs}
    for config in configs[:3]:  # the copy has the same weights: the same results
        assert torch.equal(_call(pipes[1], linears, config), references[config])
    baseline = pipeline_state(pipe)
    threads = 4

    def worker(index: int) -> list[str]:
        rng, problems = random.Random(500 + index), []
        tp = pipes[index % 2]
        for i in range(CALLS_PER_THREAD):
            config = rng.choice(configs)
            if not torch.equal(_call(tp, linears, config), references[config]):
                problems.append(f"thread {index} (pipeline {index % 2}) call {i} {config}")
        return problems

    problems = _run_threads(worker, threads)
    tally["concurrency.shared_scheduler_pipelines"] += threads * CALLS_PER_THREAD
    assert problems == [], f"{len(problems)} results differ from the same call made alone: {problems[:5]}"
    _check_at_rest(pipe, baseline)


def test_a_bare_call_in_the_middle_of_each_carriers_call_is_untouched():
    """Deterministic version of the test above: while each carrier's call runs its denoiser, a bare call
    of a ``from_pipe`` copy runs to the end in another thread. Both must equal their solo results."""
    pipe = rel_support.build(ALL_FAMILY)
    tp = TemplatePipeline(pipe)
    own = _own_pipeline(pipe)
    sets = _all_carrier_sets(tp)
    bare = {seed: _all_call(pipe, seed) for seed in SEEDS}
    baseline = pipeline_state(pipe)
    problems = []
    for name, templates in sets.items():
        for seed in SEEDS:
            reference = _all_call(tp, seed, templates)
            outputs: list[torch.Tensor] = []
            caller = threading.get_ident()

            def bare_call_now(module, args, kwargs, seed=seed, outputs=outputs, caller=caller):
                if threading.get_ident() != caller or outputs:
                    return None  # the bare call's own denoiser calls, and later steps
                thread = threading.Thread(target=lambda: outputs.append(_all_call(own, seed)), daemon=True)
                thread.start()
                thread.join(JOIN_TIMEOUT_S)
                assert not thread.is_alive(), "the bare call did not finish (deadlock?)"
                return None

            handle = pipe.transformer.register_forward_pre_hook(bare_call_now, with_kwargs=True)
            try:
                templated = _all_call(tp, seed, templates)
            finally:
                handle.remove()
            if not torch.equal(templated, reference):
                problems.append(f"{name} seed {seed}: the templated call changed")
            if len(outputs) != 1 or not torch.equal(outputs[0], bare[seed]):
                problems.append(f"{name} seed {seed}: the bare call saw the templates")
    assert problems == [], problems
    _check_at_rest(pipe, baseline)
