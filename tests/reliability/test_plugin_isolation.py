"""One broken plugin never takes the host or the other plugins down, and says who it is.

Fake distributions (``<name>-<version>.dist-info`` folders with entry points, next to their modules,
made by ``make_dist`` from test_cli_discovery.py) are put on ``sys.path`` for one test, where
importlib.metadata finds them exactly as installed packages. Each failure -- a plugin that cannot be
imported, raises in a hook, returns the wrong type, or registers a name another distribution uses --
is a ``PluginError`` naming the plugin and its distribution, and a good template call through the
same ``TemplatePipeline`` afterwards gives exactly the output it gives with no broken plugin
installed. ``DT_LOAD_PLUGINS`` / ``DT_DISABLE_PLUGINS`` decide which plugins load.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch

from diffusion_templates import PluginError, TemplatePipeline
from diffusion_templates.plugins import PluginHost
from helpers import run
from test_cli_discovery import make_dist

TEMPLATES = "diffusion_templates.templates"
CARRIERS = "diffusion_templates.carriers"

GOOD = """
import torch
from pydantic import Field

from diffusion_templates import KVCache, Template, TemplateInputs


class Inputs(TemplateInputs):
    scale: float = Field(1.0, ge=0.0, le=4.0)


class Good(Template):
    Inputs = Inputs
    carriers = ("kv",)

    def encode(self, inputs, context):
        generator = torch.Generator().manual_seed(11)
        keys, values = {}, {}
        for name, layer in context.adapter.attention_layers().items():
            shape = (1, 2, layer.heads, layer.head_dim)
            keys[name] = torch.randn(shape, generator=generator) * inputs.scale
            values[name] = torch.randn(shape, generator=generator) * inputs.scale
        return KVCache(keys=keys, values=values)
"""


def _template(body: str) -> str:
    return textwrap.dedent(
        """
        from diffusion_templates import Template, TemplateInputs


        class T(Template):
            Inputs = TemplateInputs
            carriers = ("kv",)

            def encode(self, inputs, context):
        """
    ) + textwrap.indent(textwrap.dedent(body), " " * 8)


# A carrier plugin with its own cache class and a template emitting it; `how` says how it misbehaves.
BAD_CARRIER = """
from typing import ClassVar

import torch

from diffusion_templates import Carrier, TemplateCache, Template, TemplateInputs


class OddCache(TemplateCache):
    carrier: ClassVar[str] = "odd"
    how: str


class OddCarrier(Carrier):
    name = "odd"
    cache_class = OddCache

    def supports(self, adapter):
        return True

    def merge_caches(self, caches):
        if caches[0].how == "merge_raises":
            raise RuntimeError("boom in merge")
        return {"not": "a cache"}

    def injection(self, cache, target):
        if cache.how == "inject_raises":
            raise RuntimeError("boom in inject")
        return "not an injection"


class Inputs(TemplateInputs):
    how: str = "wrong_injection"


class EmitsOdd(Template):
    Inputs = Inputs
    carriers = ("odd",)

    def encode(self, inputs, context):
        return OddCache(how=inputs.how)
"""

FAKE_MODULES = ("dt_fake_",)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder of fake distributions on sys.path for this test only."""
    templates = {  # template name -> (entry point, module source or None)
        "fake-good": ("dt_fake_good:Good", GOOD),
        "fake-import": (
            "dt_fake_import:T",
            "raise ImportError('dt_fake_import needs a missing dependency')\n",
        ),
        "fake-entry": ("dt_fake_nosuchmodule:T", None),
        "fake-shape": ("dt_fake_shape:T", "class T:\n    Inputs = dict\n"),
        "fake-hook": ("dt_fake_hook:T", _template("raise RuntimeError('boom in encode')")),
        "fake-none": ("dt_fake_none:T", _template("return None")),
        "fake-type": ("dt_fake_type:T", _template("return {'keys': 'not a cache'}")),
    }
    for name, (value, source) in templates.items():
        modules = {value.split(":")[0]: source} if source else {}
        make_dist(tmp_path, f"dt-{name}", "0.1", {TEMPLATES: {name: value}}, modules)
    odd = {TEMPLATES: {"fake-odd": "dt_fake_odd:EmitsOdd"}, CARRIERS: {"odd": "dt_fake_odd:OddCarrier"}}
    make_dist(tmp_path, "dt-fake-odd", "0.1", odd, {"dt_fake_odd": BAD_CARRIER})
    for x in "ab":  # two distributions registering one template name
        clash = {TEMPLATES: {"fake-clash": f"dt_fake_clash_{x}:T"}}
        make_dist(
            tmp_path, f"dt-fake-clash-{x}", "0.1", clash, {f"dt_fake_clash_{x}": _template("return None")}
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("DT_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("DT_DISABLE_PLUGINS", raising=False)
    importlib.invalidate_caches()
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith(FAKE_MODULES)]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def reference(flux2_pipe):
    """The good template's output with no fake distribution installed."""
    host = PluginHost()
    host.register("template", "fake-good", _load_good())
    return run(
        TemplatePipeline(flux2_pipe, plugins=host), "flux2_klein", templates=[{"template": "fake-good"}]
    )


def _load_good():
    namespace: dict = {}
    exec(compile(GOOD, "dt_fake_good", "exec"), namespace)  # the same source, registered in code
    return namespace["Good"]


def _good_call(tp: TemplatePipeline) -> torch.Tensor:
    return run(tp, "flux2_klein", templates=[{"template": "fake-good"}])


CASES = [
    # (template spec, what the message says) -- each must name plugin and distribution
    ("fake-import", "failed to load: ImportError: dt_fake_import needs a missing dependency"),
    ("fake-entry", "failed to load: ModuleNotFoundError"),
    ("fake-shape", "must define `Inputs`, a pydantic BaseModel subclass"),
    ("fake-hook", "hook 'encode' raised RuntimeError: boom in encode"),
    ("fake-none", "encode returned nothing"),
    ("fake-type", "to_cache must return TemplateCache objects, returned dict"),
    ("fake-clash", "is conflict: template name 'fake-clash' is registered by several distributions"),
]


def test_each_broken_plugin_is_named_and_the_rest_keeps_working(site, flux2_pipe, reference, tally):
    tp = TemplatePipeline(flux2_pipe, plugins=PluginHost())
    for name, message in CASES:
        with pytest.raises(PluginError) as info:
            _good_call_with(tp, name)
        text = str(info.value)
        assert f"plugin {name!r}" in text and message in text, text
        if name == "fake-clash":
            assert "dt-fake-clash-a, dt-fake-clash-b" in text
        else:
            assert f"(distribution 'dt-{name}')" in text, text
        assert torch.equal(_good_call(tp), reference), f"the good template changed after {name!r} failed"
        tally["plugins.failures_isolated"] += 1


@pytest.mark.parametrize("env", [None, "DT_LOAD_PLUGINS"])
def test_a_third_party_reusing_a_host_carrier_name_changes_nothing(site, flux2_pipe, monkeypatch, env):
    impostor = "raise RuntimeError('the impostor kv carrier must never be imported')\n"
    make_dist(site, "dt-fake-kv", "0.1", {CARRIERS: {"kv": "dt_fake_kv:Impostor"}}, {"dt_fake_kv": impostor})
    importlib.invalidate_caches()
    if env:  # the impostor is then disabled rather than in conflict: same outcome expected
        monkeypatch.setenv(env, "dt-test-templates")
    tp = TemplatePipeline(flux2_pipe, plugins=PluginHost())
    [info] = [i for i in tp.plugins.infos if i.distribution == "dt-fake-kv"]
    assert info.status == ("disabled" if env else "conflict")
    bare = run(flux2_pipe, "flux2_klein")
    assert not torch.equal(run(tp, "flux2_klein", templates=[{"template": "test-kv"}]), bare)
    assert "dt_fake_kv" not in sys.modules


def _good_call_with(tp: TemplatePipeline, name: str) -> None:
    run(tp, "flux2_klein", templates=[{"template": "fake-good"}, {"template": name}])


@pytest.mark.parametrize(
    "how,message",
    [
        ("merge_raises", "hook 'merge' raised RuntimeError: boom in merge"),
        ("wrong_merge", "merge must return a 'odd' cache, got dict"),
        ("inject_raises", "hook 'inject' raised RuntimeError: boom in inject"),
        ("wrong_injection", "inject must return an Injection, got str"),
    ],
)
def test_a_broken_carrier_plugin_is_named(site, flux2_pipe, reference, tally, how, message):
    tp = TemplatePipeline(flux2_pipe, plugins=PluginHost())
    templates = [{"template": "fake-odd", "how": how}, {"template": "fake-good"}]
    if how in ("merge_raises", "wrong_merge"):  # merge runs only for two caches of one carrier
        templates.append({"template": "fake-odd", "how": how})
    with pytest.raises(PluginError) as info:
        run(tp, "flux2_klein", templates=templates)
    assert "plugin 'odd' (distribution 'dt-fake-odd')" in str(info.value) and message in str(info.value)
    assert torch.equal(_good_call(tp), reference)
    tally["plugins.failures_isolated"] += 1


def test_load_only_the_named_plugins(site, flux2_pipe, reference, monkeypatch, tally):
    monkeypatch.setenv("DT_LOAD_PLUGINS", "dt-fake-good")
    host = PluginHost()
    status = {i.name: i.status for i in host.infos if i.kind == "template"}
    assert status["fake-good"] == "not loaded"
    assert {status[n] for n in ("fake-import", "fake-hook", "fake-odd", "test-kv")} == {"disabled"}
    assert {i.status for i in host.infos if i.distribution == "diffusion-templates"} == {"not loaded"}
    tp = TemplatePipeline(flux2_pipe, plugins=host)
    assert torch.equal(_good_call(tp), reference)
    with pytest.raises(PluginError, match=r"plugin 'fake-hook' \(distribution 'dt-fake-hook'\): is disabled"):
        _good_call_with(tp, "fake-hook")
    assert not [m for m in sys.modules if m.startswith("dt_fake_") and m != "dt_fake_good"]
    tally["plugins.env_checks"] += 1


def test_disable_named_plugins(site, flux2_pipe, reference, monkeypatch, tally):
    monkeypatch.setenv("DT_DISABLE_PLUGINS", "fake-import, dt-fake-hook")  # a plugin and a distribution name
    host = PluginHost()
    status = {i.name: i.status for i in host.infos if i.kind == "template"}
    assert status["fake-import"] == status["fake-hook"] == "disabled"
    assert status["fake-good"] == status["test-kv"] == "not loaded"
    tp = TemplatePipeline(flux2_pipe, plugins=host)
    for name in ("fake-import", "fake-hook"):
        with pytest.raises(PluginError, match="is disabled: disabled by DT_LOAD_PLUGINS"):
            _good_call_with(tp, name)
    assert torch.equal(_good_call(tp), reference)
    assert "dt_fake_import" not in sys.modules and "dt_fake_hook" not in sys.modules
    tally["plugins.env_checks"] += 1
