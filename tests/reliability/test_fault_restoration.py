"""Exact restoration under faults: a randomized loop of failing calls over every backbone family.

Each faulted call raises from one place chosen at random:

* ``template``      a template plugin fails (test-flaky: in ``encode``, in ``to_cache``, wrong type);
* ``hook_install``  installing the n-th hook or attention point of the call fails (``HookSet.add``
                    or ``AttentionPoint.attach`` raises before or after installing it): the kv/lora
                    injections are left half applied;
* ``carrier_*``     a test-only carrier raises in ``inject``, halfway through ``apply`` (after some
                    of its hooks are installed), in ``update_call_kwargs`` or in ``on_step_end``;
* ``user_callback`` the user's ``callback_on_step_end`` raises at a random step;
* ``denoiser``      a forward pre-hook on a random attention module raises on its k-th call;

with a ``KeyboardInterrupt`` instead of an exception a quarter of the time. Templates are a random
mix of kv and lora on the conditional and unconditional branches. After every faulted call the
pipeline must be bit-identical to before (``pipeline_state``: weights, buffers, processors, torch and
diffusers hooks, scheduler config), process-wide state (attention wrappers, context variables) at
rest, and the next call -- bare or templated, at random -- bit-equal to the same call on a freshly
built pipeline.
"""

from __future__ import annotations

import functools
import os
import random
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import rel_support
import torch
from diffusers.hooks import ModelHook

from diffusion_templates import Carrier, Injection, PluginError, TemplateCache, TemplatePipeline
from diffusion_templates.attention import AttentionPoint
from diffusion_templates.injection import HookSet, unique_hook_name
from diffusion_templates.plugins import PluginHost
from diffusion_templates.testing.snapshot import pipeline_state, state_differences
from helpers import FAMILIES

FAULTED_CALLS = rel_support.scaled(200)
SEED = int(os.environ.get("DT_RELIABILITY_SEED", "20250101"))
STEPS = 2
CARRIER_FAULTS = {
    "carrier_inject": "inject",
    "carrier_apply": "apply",
    "carrier_kwargs": "update_call_kwargs",
    "carrier_step": "on_step_end",
}
SITES = (
    "template",
    "hook_install",
    "carrier_inject",
    "carrier_apply",
    "carrier_kwargs",
    "carrier_step",
    "user_callback",
    "denoiser",
)


class Boom(Exception):
    """The injected fault."""


# -- a test-only carrier that fails where it is told to -----------------------------------------------------
class FaultCache(TemplateCache):
    carrier: ClassVar[str] = "test-fault"

    fail_in: str
    after: int = 0  # apply: hooks installed before the fault
    step: int = 0  # on_step_end: the step that fails
    keyboard: bool = False


def _fault(cache: FaultCache) -> BaseException:
    return KeyboardInterrupt() if cache.keyboard else Boom(f"test-fault carrier, in {cache.fail_in}")


class FaultInjection(Injection):
    """Installs pass-through hooks on every attention module, honouring the Injection contract:
    when its own ``apply`` fails it removes what it installed before raising."""

    def __init__(self, cache: FaultCache, modules: list[torch.nn.Module]):
        self.cache, self.modules, self.hooks = cache, modules, HookSet()
        if cache.fail_in == "on_step_end":
            self.step_tensor_inputs = ("latents",)

    def apply(self) -> None:
        name = unique_hook_name("test-fault")
        try:
            for i, module in enumerate(self.modules):
                if self.cache.fail_in == "apply" and i == self.cache.after:
                    raise _fault(self.cache)
                self.hooks.add(module, ModelHook(), name)
        except BaseException:
            self.hooks.remove_all()
            raise

    def remove(self) -> None:
        self.hooks.remove_all()

    def update_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.cache.fail_in == "update_call_kwargs":
            raise _fault(self.cache)
        return kwargs

    def on_step_end(self, pipe, step, timestep, tensors):
        if step == self.cache.step:
            raise _fault(self.cache)
        return {}


class FaultCarrier(Carrier):
    name = "test-fault"
    cache_class = FaultCache

    def supports(self, adapter) -> bool:
        return True

    def merge_caches(self, caches):
        return caches[0]

    def injection(self, cache: FaultCache, target) -> FaultInjection:
        if cache.fail_in == "inject":
            raise _fault(cache)
        return FaultInjection(cache, [layer.module for layer in target.adapter.attention_layers().values()])


# -- one family under test -----------------------------------------------------------------------------------
@dataclass
class Bench:
    family: str
    pipe: Any
    tp: TemplatePipeline
    baseline: dict[str, Any]
    ref_bare: torch.Tensor
    ref_templated: torch.Tensor
    layers: list[str]
    linears: list[str]
    attention_calls: dict[str, int]  # attention module calls per CFG call, by layer name


def _reference_templates(linears: list[str]) -> dict[str, Any]:
    return {
        "templates": [{"template": "test-kv", "scale": 0.5, "seed": 7, "length": 2}],
        "negative_templates": [{"template": "test-lora", "targets": linears[:2], "rank": 2, "seed": 3}],
    }


def _call(pipe_or_tp, family: str, **kwargs) -> torch.Tensor:
    return pipe_or_tp(**rel_support.call_kwargs(family, steps=STEPS, **kwargs)).images


@pytest.fixture(scope="module")
def plugins() -> PluginHost:
    host = PluginHost()
    host.register("carrier", "test-fault", FaultCarrier, distribution="tests/reliability")
    return host


@pytest.fixture(scope="module")
def benches(plugins: PluginHost) -> dict[str, Bench]:
    benches = {}
    for family in FAMILIES:
        fresh = rel_support.build(family)
        fresh_tp = TemplatePipeline(fresh, plugins=plugins)
        linears = rel_support.attention_linears(fresh_tp.adapter.denoiser)
        reference = _reference_templates(linears)
        ref_bare = _call(fresh, family)
        ref_templated = _call(fresh_tp, family, **reference)
        del fresh, fresh_tp

        pipe = rel_support.build(family)
        tp = TemplatePipeline(pipe, plugins=plugins)
        counts: dict[str, int] = {}

        def count(module, args, name, counts=counts):
            counts[name] = counts.get(name, 0) + 1

        handles = [
            layer.module.register_forward_pre_hook(functools.partial(count, name=name))
            for name, layer in tp.adapter.attention_layers().items()
        ]
        try:
            _call(pipe, family)
        finally:
            for handle in handles:
                handle.remove()
        benches[family] = Bench(
            family=family,
            pipe=pipe,
            tp=tp,
            baseline=pipeline_state(pipe),
            ref_bare=ref_bare,
            ref_templated=ref_templated,
            layers=list(tp.adapter.attention_layers()),
            linears=linears,
            attention_calls=counts,
        )
        assert torch.equal(_call(pipe, family), ref_bare), f"{family}: two fresh builds differ"
    return benches


# -- the loop ----------------------------------------------------------------------------------------------
def _random_templates(rng: random.Random, bench: Bench) -> tuple[dict[str, list], int]:
    """Random kv/lora specs per branch (at least one: a call without templates installs no hooks),
    and how many hooks the call's injections install."""
    while True:
        specs: dict[str, list] = {"templates": [], "negative_templates": []}
        hooks = 1  # BranchTracker
        for branch in specs:
            if rng.random() < 0.6:
                layers = rng.sample(bench.layers, rng.randint(1, len(bench.layers)))
                specs[branch].append(
                    {
                        "template": "test-kv",
                        "layers": layers,
                        "length": rng.randint(1, 6),
                        "scale": rng.uniform(0.1, 2.0),
                        "seed": rng.randrange(1000),
                    }
                )
                hooks += len(layers)
            if rng.random() < 0.6:
                targets = rng.sample(bench.linears, rng.randint(1, 3))
                specs[branch].append(
                    {
                        "template": "test-lora",
                        "targets": targets,
                        "rank": rng.randint(1, 8),
                        "seed": rng.randrange(1000),
                    }
                )
                hooks += len(targets)
        if hooks > 1:
            return specs, hooks


def _faulted_call(rng: random.Random, bench: Bench, site: str, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """Run one call that must fail at ``site``; returns (expected exception types, carriers used)."""
    specs, hooks = _random_templates(rng, bench)
    keyboard = site != "template" and rng.random() < 0.25
    error = KeyboardInterrupt if keyboard else Boom
    kwargs: dict[str, Any] = {}
    expected: tuple[type[BaseException], ...] = (error,)
    handle = None

    def insert(spec) -> None:
        branch = rng.choice(list(specs))
        specs[branch].insert(rng.randint(0, len(specs[branch])), spec)

    if site == "template":
        insert({"template": "test-flaky", "fail_in": rng.choice(["encode", "to_cache", "type"])})
        expected = (PluginError,)
    elif site == "hook_install":
        fail_at = rng.randint(1, hooks)
        after = fail_at > 1 and rng.random() < 0.5  # after registering: the injection must undo it
        seen = []
        original = HookSet.add

        def add(self, module, hook, name):
            seen.append(name)
            if len(seen) == fail_at and not after:
                raise error()
            original(self, module, hook, name)
            if len(seen) == fail_at:
                raise error()

        monkeypatch.setattr(HookSet, "add", add)
        # the kv carrier installs through attention points (processor wrappers), not hooks
        original_attach = AttentionPoint.attach

        def attach(self, entry):
            seen.append(self.name)
            if len(seen) == fail_at and not after:
                raise error()
            original_attach(self, entry)
            if len(seen) == fail_at:
                raise error()

        monkeypatch.setattr(AttentionPoint, "attach", attach)
    elif site.startswith("carrier_"):
        fail_in = CARRIER_FAULTS[site]
        insert(
            FaultCache(
                fail_in=fail_in,
                after=rng.randint(0, len(bench.layers) - 1),
                step=rng.randrange(STEPS),
                keyboard=keyboard,
            )
        )
        if fail_in == "inject" and not keyboard:
            expected = (PluginError,)  # the host names the carrier that raised
    elif site == "user_callback":
        step = rng.randrange(STEPS)

        def callback(pipe, i, t, tensors):
            if i == step:
                raise error(f"user callback at step {i}")
            return tensors

        kwargs["callback_on_step_end"] = callback
    elif site == "denoiser":
        layer = rng.choice(bench.layers)
        fail_at = rng.randint(1, bench.attention_calls[layer])
        calls = []

        def explode(module, args):
            calls.append(1)
            if len(calls) == fail_at:
                raise error(f"inside attention layer {layer}, call {fail_at}")

        handle = bench.tp.adapter.attention_layers()[layer].module.register_forward_pre_hook(explode)
    try:
        _call(bench.tp, bench.family, **specs, **kwargs)
    except expected:
        pass
    else:
        pytest.fail(f"the {site} fault did not fire in {bench.family} with {specs}")
    finally:
        if handle is not None:
            handle.remove()
        monkeypatch.undo()
    names = {s["template"] for branch in specs.values() for s in branch if isinstance(s, dict)}
    carriers = {carrier for name, carrier in (("test-kv", "kv"), ("test-lora", "lora")) if name in names}
    return keyboard, carriers


def test_randomized_faults_leave_the_pipeline_bit_identical(benches, tally, monkeypatch):
    rng = random.Random(SEED)
    failures: list[str] = []
    survived = 0
    for i in range(FAULTED_CALLS):
        bench = benches[FAMILIES[i % len(FAMILIES)]]
        site = rng.choice(SITES)
        keyboard, carriers = _faulted_call(rng, bench, site, monkeypatch)
        problems = (
            state_differences(bench.baseline, pipeline_state(bench.pipe))
            + rel_support.global_state_problems()
        )
        if rng.random() < 0.5:
            kind, same = "bare", torch.equal(_call(bench.pipe, bench.family), bench.ref_bare)
        else:
            reference = _reference_templates(bench.linears)
            kind, same = (
                "templated",
                torch.equal(_call(bench.tp, bench.family, **reference), bench.ref_templated),
            )
        if not same:
            problems.append(f"the next ({kind}) call differs from a fresh pipeline's")
        if problems:
            short = [p if len(p) < 300 else p[:300] + "..." for p in problems[:3]]
            failures.append(f"call {i} ({bench.family}, {site}, keyboard={keyboard}): {short}")
        else:
            survived += 1
        tally["faults.injected"] += 1
        tally[f"faults.site.{site}"] += 1
        tally[f"faults.family.{bench.family}"] += 1
        tally["faults.keyboard_interrupt"] += keyboard
        tally[f"faults.next_call.{kind}"] += 1
        for carrier in carriers:
            tally[f"faults.carrier.{carrier}"] += 1
    tally["faults.survived_bit_identical"] += survived
    assert not failures, f"{len(failures)} of {FAULTED_CALLS} faulted calls left traces:\n" + "\n".join(
        failures[:10]
    )


def test_failure_while_the_branch_tracker_registers_its_hook(monkeypatch):
    pipe = rel_support.build("flux2_klein")
    before = pipeline_state(pipe)
    original = HookSet.add

    def add(self, module, hook, name):
        original(self, module, hook, name)
        raise Boom("after registering the first hook of the call (the branch tracker's)")

    monkeypatch.setattr(HookSet, "add", add)
    with pytest.raises(Boom):
        _call(TemplatePipeline(pipe), "flux2_klein", templates=[{"template": "test-kv"}])
    monkeypatch.undo()
    assert state_differences(before, pipeline_state(pipe)) == []
