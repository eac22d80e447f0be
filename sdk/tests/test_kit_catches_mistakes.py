"""The conformance kit fails broken templates, saying what is wrong.

Three deliberately broken templates, each tested by the kit in a child pytest (``pytester``):

* ``leaky-glow`` (installed: a fake ``*.dist-info`` with entry points on the child's path) brings
  its own carrier whose ``Injection.remove`` forgets to remove the torch forward hook it added;
* ``garbage-glow`` (registered in code, ``plugin = ...``) has an input schema that accepts anything;
* ``narrow-glow`` (installed) returns kv caches whose head_dim is 7 where the backbone has 16.

Each must fail the right kit test with a message that names the problem, while its other tests
pass: the kit points at the mistake, not at everything.
"""

from __future__ import annotations

import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

HOST_REQUIREMENT = "diffusion-templates>=0.1,<0.2"

LEAKY = '''
"""A template whose carrier leaves a forward hook behind."""
import torch
from diffusion_templates import Injection, Template, TemplateCache, TemplateInputs
from diffusion_templates.carriers.base import Carrier
from pydantic import Field


class LeakyCache(TemplateCache):
    carrier = "leaky"
    gain: torch.Tensor


class LeakyInjection(Injection):
    def __init__(self, module, gain):
        self.module, self.gain, self.handle = module, gain, None

    def apply(self):
        self.handle = self.module.register_forward_hook(lambda module, args, out: out * self.gain)

    def remove(self):
        pass  # BUG: forgets self.handle.remove()


class LeakyCarrier(Carrier):
    name = "leaky"
    cache_class = LeakyCache

    def supports(self, adapter):
        return True

    def merge_caches(self, caches):
        gain = caches[0].gain
        for cache in caches[1:]:
            gain = gain * cache.gain
        return LeakyCache(gain=gain)

    def injection(self, cache, target):
        first = next(iter(target.adapter.attention_layers().values()))
        return LeakyInjection(first.module.to_q, cache.gain)


class LeakyInputs(TemplateInputs):
    strength: float = Field(1.5, ge=0, le=2)


class LeakyTemplate(Template):
    Inputs = LeakyInputs
    carriers = ("leaky",)
    backbones = ("flux2",)

    def encode(self, inputs, context):
        return LeakyCache(gain=torch.tensor([inputs.strength]))
'''

NARROW = '''
"""A kv template that gets the backbone's head_dim wrong."""
import torch
from diffusion_templates import KVCache, Template, TemplateInputs
from pydantic import Field


class NarrowInputs(TemplateInputs):
    scale: float = Field(1.0, ge=0, le=2)


class NarrowTemplate(Template):
    Inputs = NarrowInputs
    carriers = ("kv",)
    backbones = ("flux2",)

    def encode(self, inputs, context):
        generator = torch.Generator().manual_seed(0)
        keys, values = {}, {}
        for name, layer in context.adapter.attention_layers().items():
            shape = (1, 2, layer.heads, 7)  # BUG: should be layer.head_dim
            keys[name] = torch.randn(shape, generator=generator) * inputs.scale
            values[name] = torch.randn(shape, generator=generator)
        return KVCache(keys=keys, values=values)
'''

TESTS = '''
from typing import Any

import torch
from diffusion_templates import KVCache, Template
from dt_sdk.conformance import TemplateConformance
from pydantic import BaseModel, ConfigDict


class GarbageInputs(BaseModel):  # BUG: takes any field and any value
    model_config = ConfigDict(extra="allow")
    scale: Any = 1.0


class GarbageTemplate(Template):
    Inputs = GarbageInputs
    carriers = ("kv",)
    backbones = ("flux2",)

    def encode(self, inputs, context):
        generator = torch.Generator().manual_seed(1)
        keys, values = {}, {}
        for name, layer in context.adapter.attention_layers().items():
            shape = (1, 2, layer.heads, layer.head_dim)
            keys[name] = torch.randn(shape, generator=generator) * float(inputs.scale)
            values[name] = torch.randn(shape, generator=generator)
        return KVCache(keys=keys, values=values)


class TestLeaky(TemplateConformance):
    template = "leaky-glow"
    valid_inputs = {"strength": 1.5}
    invalid_inputs = [{"strength": 3.0}]


class TestGarbage(TemplateConformance):
    template = "garbage-glow"
    plugin = GarbageTemplate
    valid_inputs = {"scale": 1.0}
    invalid_inputs = [{"scale": "bright"}]


class TestNarrow(TemplateConformance):
    template = "narrow-glow"
    valid_inputs = {"scale": 1.0}
    invalid_inputs = [{"scale": 5.0}]
'''


def fake_distribution(root: Path, dist: str, module: str, source: str, keywords: list[str],
                      entry_points: dict[str, dict[str, str]]) -> None:
    """``module.py`` and a ``*.dist-info`` beside it: on sys.path, importlib.metadata sees it installed."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\nKeywords: {','.join(keywords)}\n"
        f"Requires-Dist: {HOST_REQUIREMENT}\n")
    groups = "".join(f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in eps.items()) + "\n"
                     for group, eps in entry_points.items())
    (info / "entry_points.txt").write_text(groups)


@pytest.fixture(scope="module")
def kit_report(tmp_path_factory: pytest.TempPathFactory, child_env: dict[str, str]):
    """Run the kit on the three broken templates once; (junit results by test id, terminal output)."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("broken")
    fake_distribution(root, "dt-template-leaky-glow", "leaky_glow", LEAKY,
                      ["dt-carrier:leaky", "dt-backbone:flux2"],
                      {"diffusion_templates.templates": {"leaky-glow": "leaky_glow:LeakyTemplate"},
                       "diffusion_templates.carriers": {"leaky": "leaky_glow:LeakyCarrier"}})
    fake_distribution(root, "dt-template-narrow-glow", "narrow_glow", NARROW,
                      ["dt-carrier:kv", "dt-backbone:flux2"],
                      {"diffusion_templates.templates": {"narrow-glow": "narrow_glow:NarrowTemplate"}})
    (root / "test_broken.py").write_text(textwrap.dedent(TESTS))
    report = root / "report.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rf", f"--junitxml={report}",
         "test_broken.py"],
        cwd=root, env={**child_env, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    if proc.returncode != 1:
        raise AssertionError(f"the kit should fail the broken templates (exit 1), got {proc.returncode}:\n"
                             + output)
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        key = f"{case.get('classname').rsplit('.', 1)[-1]}::{case.get('name')}"
        failure = case.find("failure")
        error = case.find("error")
        skipped = case.find("skipped")
        if failure is not None:
            results[key] = ("failed", failure.get("message", "") + "\n" + (failure.text or ""))
        elif error is not None:
            results[key] = ("error", error.get("message", "") + "\n" + (error.text or ""))
        elif skipped is not None:
            results[key] = ("skipped", skipped.get("message", ""))
        else:
            results[key] = ("passed", "")
    return results, output


def outcome(kit_report, test_id: str) -> tuple[str, str]:
    results, output = kit_report
    assert test_id in results, f"{test_id} did not run; ran {sorted(results)}\n{output}"
    return results[test_id]


def assert_passed(kit_report, cls: str, tests: tuple[str, ...]) -> None:
    for test in tests:
        status, message = outcome(kit_report, f"{cls}::{test}")
        assert status == "passed", f"{cls}::{test} {status}: {message}"


def test_leaked_hook_is_caught(kit_report):
    status, message = outcome(kit_report, "TestLeaky::test_injection_changes_output_and_is_undone[flux2]")
    assert status == "failed"
    assert "template 'leaky-glow' left the pipeline changed after a call on backbone 'flux2'" in message
    assert "transformer.module.transformer_blocks.0.attn.to_q: torch hooks changed (_forward_hooks: 0 -> 1)" \
        in message
    assert "template 'leaky-glow' left the pipeline changed after a call that raised" in (
        outcome(kit_report, "TestLeaky::test_injection_is_undone_when_the_call_fails[flux2]")[1])
    # It is the leak, and only the leak, that the kit reports.
    assert_passed(kit_report, "TestLeaky", (
        "test_entry_point", "test_rejects_invalid_inputs", "test_caches_fit_backbone[flux2]",
        "test_cache_round_trips[flux2]"))


def test_garbage_schema_is_caught(kit_report):
    status, message = outcome(kit_report, "TestGarbage::test_rejects_invalid_inputs")
    assert status == "failed"
    assert "template 'garbage-glow'" in message
    assert "input schema accepted garbage {'scale': 'bright'}" in message
    unknown = "{'dt_conformance_unknown_field': 'garbage'} (unknown field)"
    assert f"input schema accepted garbage {unknown}" in message
    assert outcome(kit_report, "TestGarbage::test_entry_point")[0] == "skipped"  # registered in code
    assert_passed(kit_report, "TestGarbage", (
        "test_accepts_valid_inputs", "test_caches_fit_backbone[flux2]",
        "test_injection_changes_output_and_is_undone[flux2]", "test_composes_with_another_template[flux2]"))


def test_wrong_head_dim_is_caught(kit_report):
    status, message = outcome(kit_report, "TestNarrow::test_caches_fit_backbone[flux2]")
    assert status == "failed"
    assert "template 'narrow-glow' on backbone 'flux2'" in message
    assert "kv cache layer 'double_0' has head_dim 7, backbone 'flux2' expects 16" in message
    # The injection test cannot run it either, and says why in the host's words.
    status, message = outcome(kit_report, "TestNarrow::test_injection_changes_output_and_is_undone[flux2]")
    assert status == "failed" and "(heads, head_dim) is (2, 7)" in message
    assert "During handling" not in message  # the kit's messages come without chained tracebacks
    assert_passed(kit_report, "TestNarrow", ("test_entry_point", "test_rejects_invalid_inputs",
                                             "test_cache_round_trips[flux2]"))


def test_messages_reach_the_terminal(kit_report):
    """What an author sees: the short summary names each problem."""
    _, output = kit_report
    print(output)
    assert "left the pipeline changed" in output
    assert "input schema accepted garbage" in output
    assert "has head_dim 7, backbone 'flux2' expects 16" in output
