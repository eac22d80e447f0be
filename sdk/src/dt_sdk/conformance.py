"""The conformance kit: a ready test battery for template packages, and the pytest plugin that ships it.

In a template package's tests::

    from dt_sdk.conformance import TemplateConformance

    class TestMyGlow(TemplateConformance):
        template = "my-glow"
        valid_inputs = {"scale": 1.0, "tokens": 4}
        invalid_inputs = [{"scale": 5.0}, {"tokens": 0}, {"strength": 1.0}]

and ``pytest`` runs, for the installed template (entry point ``my-glow``):

* it is installed and loads through :class:`diffusion_templates.plugins.PluginHost`, and its
  distribution metadata (``Requires-Dist`` on the host, ``dt-carrier:``/``dt-backbone:`` keywords)
  matches what the plugin declares;
* its input schema accepts every ``valid_inputs`` and rejects every ``invalid_inputs`` entry (each
  entry overrides the first valid inputs; :data:`MISSING` deletes a field; ``(entry, "field")``
  names the field the error must name) with a ``TemplateInputError`` naming the template and field;
* on a tiny offline pipeline of each declared backbone: ``encode``/``to_cache`` give caches of the
  declared carriers that fit the backbone (``TemplatePipeline.prepare`` accepts them), each cache
  round-trips through ``save``/``load`` bit-exactly, injecting it changes the output and leaves the
  pipeline bit-identical afterwards (also when the call raises), and it composes with the kit's
  companion template (:mod:`dt_sdk.companion`);
* its Template model (the plugin's ``Model``) saves and loads safetensors only, refuses pickled
  weights and refuses a weights folder that contains code.

Failures say what is wrong in words. The plugin also provides fixtures: ``tiny_pipeline`` (a
factory: ``tiny_pipeline("flux2")`` builds a fresh tiny pipeline of that backbone) and
``dt_plugin_host`` (a :class:`PluginHost` with the companion template registered).

Importing this module is cheap: torch and diffusers load when a test runs.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

__all__ = [
    "MISSING", "TINY_BACKBONES", "TemplateConformance", "TinyBackbone", "build_tiny_pipeline",
    "cache_differences", "cache_fit_problems", "caches_equal", "describe_state_differences",
    "make_plugin_host", "single_thread",
    "tiny_call_kwargs_for", "validate_inputs",
]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
"""In an ``invalid_inputs`` entry: remove this field from the valid inputs (to test required fields)."""


@dataclass(frozen=True)
class TinyBackbone:
    """Which tiny pipeline (``diffusion_templates.testing.tiny.TINY_PIPELINES`` key) stands for a backbone."""

    family: str
    cfg: bool = False  # run real classifier-free guidance (both branches) in the kit's calls


# Backbone adapter name -> tiny pipeline. CFG is on where it exercises another path: sequential
# branches under cache_context (FLUX.2 klein base) and batched [uncond, cond] calls (SD3, SDXL).
TINY_BACKBONES: dict[str, TinyBackbone] = {
    "flux2": TinyBackbone("flux2_klein", cfg=True),
    "flux": TinyBackbone("flux"),
    "sd3": TinyBackbone("sd3", cfg=True),
    "qwen_image": TinyBackbone("qwen_image"),
    "sdxl": TinyBackbone("sdxl", cfg=True),
}


# --------------------------------------------------------------------------------------------- helpers


def build_tiny_pipeline(backbone: str, *, seed: int = 0,
                        backbones: Mapping[str, TinyBackbone] = TINY_BACKBONES) -> Any:
    """A fresh tiny offline pipeline (random weights, CPU) of ``backbone`` (an adapter name)."""
    from diffusion_templates.testing.tiny import TINY_PIPELINES

    if backbone not in backbones:
        raise KeyError(f"the conformance kit has no tiny pipeline for backbone {backbone!r} "
                       f"(it has {sorted(backbones)})")
    return TINY_PIPELINES[backbones[backbone].family].build(seed=seed)


def tiny_call_kwargs_for(backbone: str, *, backbones: Mapping[str, TinyBackbone] = TINY_BACKBONES,
                         **overrides: Any) -> dict[str, Any]:
    """Keyword arguments (all but the prompt) of a fast deterministic call, latents out."""
    from diffusion_templates.testing.tiny import tiny_call_kwargs

    spec = backbones[backbone]
    kwargs = tiny_call_kwargs(spec.family, cfg=spec.cfg, output_type="latent")
    kwargs.update(overrides)
    return kwargs


def make_plugin_host(*registered: tuple[str, str, Any]) -> Any:
    """A :class:`PluginHost` from installed metadata, with the companion template registered in code.

    ``registered`` adds more ``(kind, name, object)`` plugins through ``PluginHost.register``.
    """
    from diffusion_templates.plugins import PluginHost

    from .companion import COMPANION, CompanionTemplate

    host = PluginHost()
    host.register("template", COMPANION, CompanionTemplate, distribution="dt-sdk (conformance kit)")
    for kind, name, obj in registered:
        host.register(kind, name, obj)
    return host


def validate_inputs(plugin: Any, template: str, fields: Mapping[str, Any]) -> Any:
    """Validate ``fields`` against ``plugin.Inputs`` as ``TemplatePipeline.resolve`` does."""
    from diffusion_templates import TemplateInputError
    from pydantic import ValidationError

    try:
        return plugin.Inputs.model_validate(dict(fields))
    except ValidationError as exc:
        errors = [(".".join(str(p) for p in e["loc"]) or "<inputs>", e["msg"], e.get("input"))
                  for e in exc.errors()]
        raise TemplateInputError(template, errors) from None


def _bits(tensor: Any) -> Any:
    import torch

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    try:
        return flat.view(torch.uint8)
    except RuntimeError:  # dtypes that cannot be viewed as bytes: compare values
        return flat


def cache_differences(a: Any, b: Any) -> list[str]:
    """How two Template caches differ, bit for bit (empty when identical)."""
    import torch

    if type(a) is not type(b):
        return [f"cache class {type(a).__name__} became {type(b).__name__}"]
    diffs = []
    fields_a = a.model_dump(mode="json", exclude=set(a.tensor_fields()))
    fields_b = b.model_dump(mode="json", exclude=set(b.tensor_fields()))
    for key in sorted(fields_a.keys() | fields_b.keys()):
        if fields_a.get(key, MISSING) != fields_b.get(key, MISSING):
            diffs.append(f"field {key!r} changed: {_short(repr(fields_a.get(key, MISSING)))} -> "
                         f"{_short(repr(fields_b.get(key, MISSING)))}")
    ta, tb = a.flat_tensors(), b.flat_tensors()
    for key in sorted(ta.keys() - tb.keys()):
        diffs.append(f"tensor {key!r} disappeared")
    for key in sorted(tb.keys() - ta.keys()):
        diffs.append(f"tensor {key!r} appeared")
    for key in sorted(ta.keys() & tb.keys()):
        x, y = ta[key], tb[key]
        if x.dtype != y.dtype:
            diffs.append(f"tensor {key!r} dtype {x.dtype} became {y.dtype}")
        elif tuple(x.shape) != tuple(y.shape):
            diffs.append(f"tensor {key!r} shape {tuple(x.shape)} became {tuple(y.shape)}")
        elif not torch.equal(_bits(x), _bits(y)):
            diffs.append(f"tensor {key!r} values changed")
    return diffs


def caches_equal(a: Any, b: Any) -> bool:
    """Whether two Template caches are bit-identical (class, fields, tensor dtypes, shapes, bits)."""
    return not cache_differences(a, b)


def cache_fit_problems(cache: Any, adapter: Any) -> list[str]:
    """Why ``cache`` does not fit ``adapter``'s denoiser, in words (kv and lora caches; empty if it fits)."""
    import torch

    problems = []
    if cache.carrier == "kv":
        layers = adapter.attention_layers()
        for name, key in cache.keys.items():
            layer = layers.get(name)
            if layer is None:
                problems.append(f"kv cache layer {name!r} does not exist on backbone {adapter.name!r} "
                                f"(its layers: {', '.join(layers)})")
                continue
            heads, head_dim = key.shape[2], key.shape[3]
            if head_dim != layer.head_dim:
                problems.append(f"kv cache layer {name!r} has head_dim {head_dim}, backbone {adapter.name!r} "
                                f"expects {layer.head_dim}")
            if heads != layer.heads:
                problems.append(f"kv cache layer {name!r} has {heads} heads, backbone {adapter.name!r} "
                                f"expects {layer.heads}")
    elif cache.carrier == "lora":
        denoiser = adapter.denoiser
        for path, down in cache.down.items():
            try:
                module = denoiser.get_submodule(path)
            except AttributeError:
                problems.append(f"lora cache module {path!r} does not exist in {type(denoiser).__name__} "
                                f"(backbone {adapter.name!r})")
                continue
            if not isinstance(module, torch.nn.Linear):
                problems.append(f"lora cache module {path!r} is a {type(module).__name__}, "
                                "not a torch.nn.Linear")
                continue
            up = cache.up[path]
            if (down.shape[1], up.shape[0]) != (module.in_features, module.out_features):
                problems.append(f"lora cache module {path!r} maps {down.shape[1]} -> {up.shape[0]} features, "
                                f"the layer on backbone {adapter.name!r} maps {module.in_features} -> "
                                f"{module.out_features}")
    return problems


def _short(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(message: str) -> None:
    """Fail the test with ``message`` alone: no traceback, no chained exception."""
    __tracebackhide__ = True
    raise pytest.fail.Exception(message, pytrace=False) from None


def _fail_problems(header: str, problems: list[str]) -> None:
    __tracebackhide__ = True
    if len(problems) == 1:
        _fail(f"{header}: {problems[0]}")
    _fail(f"{header}:\n  - " + "\n  - ".join(problems))


def _record_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What changed in one module record of ``diffusion_templates.testing.snapshot.pipeline_state``."""
    out = []
    for field in a:
        before, after = a[field], b.get(field)
        if field in ("processor", "forward"):
            if before is after:
                continue
        elif before == after:
            continue
        if field == "torch_hooks":
            changed = [f"{name}: {len(before.get(name, ()))} -> {len(after.get(name, ()))}"
                       for name in before if before.get(name) != after.get(name)]
            out.append(f"torch hooks changed ({', '.join(changed)}): a hook was left behind or removed")
        elif field == "forward":
            what = "added" if before is None else "removed" if after is None else "replaced"
            out.append(f"forward changed (instance `forward` attribute {what}: a diffusers hook was not "
                       "cleaned up)")
        elif field == "processor":
            out.append(f"attention processor changed ({type(before).__name__} -> {type(after).__name__})")
        elif field == "dict_keys":
            added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
            out.append(f"instance attributes changed (added {added}, removed {removed})")
        elif field == "diffusers_hooks":
            out.append(f"diffusers hooks changed ({_short(before, 120)} -> {_short(after, 120)})")
        else:
            out.append(f"{field} changed ({_short(before, 120)} -> {_short(after, 120)})")
    return out


def describe_state_differences(before: dict[str, Any], after: dict[str, Any], limit: int = 10) -> list[str]:
    """Like ``state_differences`` of two ``pipeline_state`` snapshots, worded for a template author."""
    import torch

    diffs = [f"{k}: appeared" for k in sorted(after.keys() - before.keys())]
    diffs += [f"{k}: disappeared" for k in sorted(before.keys() - after.keys())]
    for key in sorted(before.keys() & after.keys()):
        a, b = before[key], after[key]
        if isinstance(a, torch.Tensor):
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(_bits(a), _bits(b)):
                diffs.append(f"{key}: tensor changed (weights were written)")
        elif isinstance(a, dict) and "torch_hooks" in a and isinstance(b, dict):
            diffs += [f"{key}: {d}" for d in _record_differences(a, b)]
        elif a != b:
            diffs.append(f"{key}: changed")
    return diffs[:limit] + ([f"... and {len(diffs) - limit} more"] if len(diffs) > limit else [])


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _StopCall(Exception):
    """Raised from a step callback to make a pipeline call fail half way."""


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block (restored after).

    Tiny models gain nothing from threads, and on a busy machine (CI, several test runs at once)
    torch's thread pool makes each small op wait for its peers: calls get 10-100x slower.
    """
    import torch

    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _attention_backends() -> dict[Any, Any]:
    """diffusers' attention backend table: the kv carrier wraps its functions during a call."""
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    except ImportError:  # private API moved: nothing to compare
        return {}
    return dict(_AttentionBackendRegistry._backends)


def _snapshot(pipe: Any) -> tuple[dict[str, Any], dict[Any, Any]]:
    from diffusion_templates.testing.snapshot import pipeline_state

    return pipeline_state(pipe), _attention_backends()


def _snapshot_differences(before: tuple[dict[str, Any], dict[Any, Any]], pipe: Any) -> list[str]:
    state, backends = _snapshot(pipe)
    diffs = describe_state_differences(before[0], state)
    for name in sorted(before[1].keys() | backends.keys(), key=str):
        if before[1].get(name) is not backends.get(name):
            diffs.append(f"diffusers attention backend {getattr(name, 'value', name)!r}: function changed "
                         f"({_short(before[1].get(name), 80)} -> {_short(backends.get(name), 80)})")
    return diffs


@dataclass
class _Pooled:
    pipe: Any
    snapshot: tuple[dict[str, Any], dict[Any, Any]]  # after the build and one warm-up call
    baseline: Any  # output of the warm-up call


# Tiny pipelines are built once per backbone and reused while they stay bit-identical to how they
# were built: a test that leaves one changed fails, and the next test gets a fresh build.
_POOL: dict[tuple[Any, ...], _Pooled] = {}


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def tiny_pipeline() -> Callable[..., Any]:
    """A factory: ``tiny_pipeline("flux2")`` builds a fresh tiny offline pipeline of that backbone."""

    def build(backbone: str, *, seed: int = 0) -> Any:
        with single_thread():
            return build_tiny_pipeline(backbone, seed=seed)

    return build


@pytest.fixture
def dt_plugin_host() -> Any:
    """A PluginHost from installed metadata, with the kit's companion template registered."""
    return make_plugin_host()


def pytest_report_header(config: pytest.Config) -> str:
    from diffusion_templates import __version__ as host_version

    from . import __version__

    return f"dt-sdk conformance kit {__version__} (diffusion-templates {host_version})"


# --------------------------------------------------------------------------------------------- the battery


class TemplateConformance:
    """Subclass as ``TestSomething``; set :attr:`template`, :attr:`valid_inputs`, :attr:`invalid_inputs`."""

    template: ClassVar[str] = ""
    """The template's name (its entry point name in ``diffusion_templates.templates``)."""
    valid_inputs: ClassVar[Mapping[str, Any] | Sequence[Mapping[str, Any]]] = {}
    """Inputs the schema must accept (a dict, or a list of dicts; the first is used for the calls)."""
    invalid_inputs: ClassVar[Sequence[Mapping[str, Any] | tuple[Mapping[str, Any], str]]] = ()
    """Overrides of the first valid inputs that the schema must reject, optionally with the field to name."""
    plugin: ClassVar[Any] = None
    """Test a plugin object/class registered in code under :attr:`template` instead of an entry point."""
    backbones: ClassVar[Sequence[str] | None] = None
    """Backbones to test (default: those the plugin declares, or every kit backbone for ``"*"``)."""
    tiny_backbones: ClassVar[Mapping[str, TinyBackbone]] = TINY_BACKBONES
    model_class: ClassVar[type | None] = None
    """The Template model class (default: the plugin's ``Model`` attribute; none: model tests skip)."""
    model_kwargs: ClassVar[Mapping[str, Any]] = {}
    """Arguments that build a small instance of the model class."""
    prompt: ClassVar[str] = "a photo of a cat"

    # -- collection ----------------------------------------------------------------------------------
    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "backbone" in metafunc.fixturenames:
            names = self._backbones_to_test()
            metafunc.parametrize("backbone", names, ids=names)

    def _backbones_to_test(self) -> list[str]:
        if self.backbones is not None:
            return list(self.backbones)
        try:
            host = self._host()
            plugin = host.get("template", self.template)
            declared = tuple(getattr(plugin, "backbones", ("*",)) or ())
            if "*" not in declared:
                return list(declared)
            carriers = tuple(getattr(plugin, "carriers", ()) or ())
            names = []
            for name in self.tiny_backbones:
                try:
                    adapter = host.get("backbone", name)(None)
                    if all(host.get("carrier", c).supports(adapter) for c in carriers):
                        names.append(name)
                except Exception:  # backbone or carrier not installed here: not testable
                    continue
            return names
        except Exception:  # the non-parametrised tests report why the plugin does not load
            return list(self.tiny_backbones)

    # -- shared steps ----------------------------------------------------------------------------------
    def _name(self) -> str:
        if not self.template:
            _fail(f"{type(self).__name__}: set `template = \"<name>\"` (the template's entry point name)")
        return self.template

    def _host(self) -> Any:
        extra = [("template", self.template, self.plugin)] if self.plugin is not None else []
        return make_plugin_host(*extra)

    def _plugin(self, host: Any) -> Any:
        from diffusion_templates import PluginError

        name = self._name()
        try:
            return host.get("template", name)
        except PluginError as exc:
            _fail(f"template {name!r} does not load through the plugin host: {exc}")

    def _valid(self) -> list[dict[str, Any]]:
        valid = self.valid_inputs
        items = [valid] if isinstance(valid, Mapping) else list(valid)
        return [dict(v) for v in items] or [{}]

    def _spec(self) -> dict[str, Any]:
        return {"template": self._name(), **self._valid()[0]}

    def _pool_key(self, backbone: str) -> tuple[Any, ...]:
        return (backbone, self.tiny_backbones[backbone], self.prompt)

    def _pooled(self, backbone: str) -> _Pooled:
        """A warmed-up tiny pipeline of ``backbone`` in its pristine state, with its baseline output."""
        if backbone not in self.tiny_backbones:
            pytest.skip(f"the conformance kit has no tiny pipeline for backbone {backbone!r}; add a "
                        f"TinyBackbone for it to `tiny_backbones` (it has {sorted(self.tiny_backbones)})")
        key = self._pool_key(backbone)
        pooled = _POOL.get(key)
        if pooled is None or _snapshot_differences(pooled.snapshot, pooled.pipe):
            with single_thread():
                pipe = build_tiny_pipeline(backbone, backbones=self.tiny_backbones)
            # The warm-up calls matter: diffusers adds a hook registry to the denoiser on first use,
            # and some VAEs (Qwen-Image's) add cache attributes on their first encode/decode.
            with single_thread():
                pipe(prompt=self.prompt, **tiny_call_kwargs_for(backbone, backbones=self.tiny_backbones,
                                                                output_type="np"))
            baseline = self._call(pipe, backbone)
            pooled = _POOL[key] = _Pooled(pipe, _snapshot(pipe), baseline)
        return pooled

    def _pipelines(self, backbone: str, host: Any) -> tuple[Any, Any]:
        """(tiny diffusers pipeline, TemplatePipeline around it) for ``backbone``."""
        from diffusion_templates import TemplatePipeline

        pipe = self._pooled(backbone).pipe
        tp = TemplatePipeline(pipe, plugins=host)
        if tp.adapter.name != backbone:
            _fail(f"the tiny pipeline for backbone {backbone!r} was matched by adapter {tp.adapter.name!r}")
        return pipe, tp

    def _call(self, target: Any, backbone: str, **extra: Any) -> Any:
        import torch

        kwargs = tiny_call_kwargs_for(backbone, backbones=self.tiny_backbones)
        with single_thread():
            out = target(prompt=self.prompt, **kwargs, **extra)
        images = out.images if hasattr(out, "images") else out[0]
        return torch.as_tensor(images).detach().clone()

    def _encode(self, tp: Any, backbone: str) -> list[Any]:
        name = self._name()
        try:
            with single_thread():
                return tp.encode(self._spec())
        except Exception as exc:
            _fail(f"template {name!r} failed to encode {self._valid()[0]!r} on backbone {backbone!r}: "
                  f"{_error(exc)}")

    def _templated_call(self, tp: Any, backbone: str, what: str, **extra: Any) -> Any:
        try:
            return self._call(tp, backbone, **extra)
        except Exception as exc:
            _fail(f"{what} failed on backbone {backbone!r}: {_error(exc)}")

    def _check_unchanged(self, backbone: str, when: str) -> None:
        """Fail if the pooled pipeline (or diffusers' global attention table) differs from pristine."""
        pooled = _POOL[self._pool_key(backbone)]
        diffs = _snapshot_differences(pooled.snapshot, pooled.pipe)
        if diffs:
            _fail(f"template {self._name()!r} left the pipeline changed {when} on backbone {backbone!r} "
                  "(every change an injection makes must be undone when the call ends):\n  - "
                  + "\n  - ".join(_short(d, 300) for d in diffs))

    # -- installation and metadata -----------------------------------------------------------------------
    def test_entry_point(self) -> None:
        """The template is installed, loads through PluginHost, and its metadata matches the plugin."""
        from diffusion_templates.plugins import GROUPS, PluginHost

        name = self._name()
        if self.plugin is not None:
            pytest.skip(f"template {name!r} is registered in code (`plugin = ...`), not by an entry point")
        host = PluginHost()
        info = host.info("template", name)
        if info is None:
            installed = ", ".join(host.names("template")) or "none"
            _fail(f"template {name!r} is not installed: no entry point named {name!r} in group "
                  f"{GROUPS['template']!r} (installed templates: {installed}). Declare it under "
                  f"[project.entry-points.\"{GROUPS['template']}\"] in pyproject.toml and `pip install -e .`")
        if not info.usable:
            _fail(f"template {name!r} ({info.distribution} {info.version}) is {info.status}: {info.problem}")
        plugin = self._plugin(host)
        problems = []
        if not info.host_requires:
            problems.append(f"distribution {info.distribution!r} declares no requirement on "
                            "diffusion-templates (add e.g. \"diffusion-templates>=0.1,<0.2\" to its "
                            "dependencies): the host cannot tell which host versions it supports")
        carriers = tuple(getattr(plugin, "carriers", ()) or ())
        if set(info.carriers) != set(carriers):
            problems.append(f"distribution {info.distribution!r} keywords say carriers "
                            f"{sorted(info.carriers)} (dt-carrier:<name>), the plugin declares "
                            f"{sorted(carriers)}: `dt list` would show the wrong carriers")
        backbones = tuple(b for b in getattr(plugin, "backbones", ()) or () if b != "*")
        if set(info.backbones) != set(backbones):
            problems.append(f"distribution {info.distribution!r} keywords say backbones "
                            f"{sorted(info.backbones)} (dt-backbone:<name>), the plugin declares "
                            f"{sorted(backbones)}: `dt list` would show the wrong backbones")
        if problems:
            _fail_problems(f"template {name!r}", problems)

    def test_declares_carriers_and_backbones(self) -> None:
        """``carriers`` and ``backbones`` are non-empty and name installed plugins."""
        from diffusion_templates import PluginError

        name = self._name()
        host = self._host()
        plugin = self._plugin(host)
        problems = []
        carriers = tuple(getattr(plugin, "carriers", ()) or ())
        if not carriers:
            problems.append("declares no carriers (set `carriers = (\"kv\",)` or similar)")
        for carrier in carriers:
            try:
                host.get("carrier", carrier)
            except PluginError as exc:
                problems.append(f"declares carrier {carrier!r}, which is not available: {exc}")
        backbones = tuple(getattr(plugin, "backbones", ()) or ())
        if not backbones:
            problems.append("declares no backbones (set e.g. `backbones = (\"flux2\", \"flux\")`, "
                            "or (\"*\",) for any)")
        for backbone in backbones:
            if backbone == "*":
                continue
            try:
                adapter = host.get("backbone", backbone)(None)
            except PluginError as exc:
                problems.append(f"declares backbone {backbone!r}, which is not available: {exc}")
                continue
            for carrier in carriers:
                try:
                    ok = host.get("carrier", carrier).supports(adapter)
                except PluginError:
                    continue
                if not ok:
                    problems.append(f"declares backbone {backbone!r} and carrier {carrier!r}, but "
                                    f"{backbone!r} does not support {carrier!r} (it supports "
                                    f"{sorted(adapter.carriers)})")
        if problems:
            _fail_problems(f"template {name!r}", problems)

    # -- input schema ---------------------------------------------------------------------------------------
    def test_accepts_valid_inputs(self) -> None:
        from diffusion_templates import TemplateInputError

        name = self._name()
        plugin = self._plugin(self._host())
        for fields in self._valid():
            try:
                validate_inputs(plugin, name, fields)
            except TemplateInputError as exc:
                _fail(f"input schema of template {name!r} rejected valid inputs {fields!r}:\n{exc}")

    def test_rejects_invalid_inputs(self) -> None:
        """Every ``invalid_inputs`` entry, an unknown field and non-numbers for numeric fields are refused."""
        from diffusion_templates import TemplateInputError

        name = self._name()
        plugin = self._plugin(self._host())
        if not self.invalid_inputs:
            _fail(f"{type(self).__name__}.invalid_inputs is empty: list inputs that the schema of template "
                  f"{name!r} must reject, e.g. [{{\"scale\": 5.0}}]")
        base = self._valid()[0]
        cases: list[tuple[dict[str, Any], set[str], str]] = []
        for entry in self.invalid_inputs:
            override, field = (entry if isinstance(entry, tuple) else (entry, None))
            override = dict(override)
            expected = {field} if field else set(override)
            cases.append((override, expected, "declared"))
        unknown = "dt_conformance_unknown_field"
        cases.append(({unknown: "garbage"}, {unknown}, "unknown field"))
        for field, info in plugin.Inputs.model_fields.items():
            if _is_numeric(info.annotation):
                cases.append(({field: "garbage"}, {field}, "not a number"))
        problems = []
        for override, expected, kind in cases:
            fields = {**base, **override}
            fields = {k: v for k, v in fields.items() if v is not MISSING}
            try:
                validate_inputs(plugin, name, fields)
            except TemplateInputError as exc:
                named = {loc.split(".")[0] for loc, _, _ in exc.errors}
                if exc.template != name:
                    problems.append(f"the error for {override!r} names template {exc.template!r}, "
                                    f"not {name!r}")
                elif not named & expected:
                    problems.append(f"input schema rejected {override!r} but the error names "
                                    f"{sorted(named)}, not {sorted(expected)}")
            except Exception as exc:
                problems.append(f"input schema raised {_error(exc)} for {override!r} instead of a "
                                "validation error (validators must raise ValueError or AssertionError)")
            else:
                note = "" if kind == "declared" else f" ({kind})"
                problems.append(f"input schema accepted garbage {override!r}{note}")
        if problems:
            _fail_problems(f"template {name!r}", problems)

    # -- caches -------------------------------------------------------------------------------------------
    def test_caches_fit_backbone(self, backbone: str) -> None:
        """encode -> to_cache gives caches of the declared carriers that the backbone accepts."""
        name = self._name()
        host = self._host()
        plugin = self._plugin(host)
        _, tp = self._pipelines(backbone, host)
        caches = self._encode(tp, backbone)
        declared = tuple(getattr(plugin, "carriers", ()) or ())
        problems = []
        for cache in caches:
            if cache.carrier not in declared:
                problems.append(f"returned a {cache.carrier!r} cache but declares carriers {list(declared)}")
            problems += cache_fit_problems(cache, tp.adapter)
        if problems:
            _fail_problems(f"template {name!r} on backbone {backbone!r}", problems)
        try:
            from diffusion_templates.context import CallState

            # The call's own arguments (its size above all) are what carriers check caches against.
            call = CallState(kwargs={"prompt": self.prompt,
                                     **tiny_call_kwargs_for(backbone, backbones=self.tiny_backbones)})
            tp.prepare([self._spec()], call=call)
        except Exception as exc:
            _fail(f"backbone {backbone!r} rejected the caches of template {name!r}: {_error(exc)}")

    def test_cache_round_trips(self, backbone: str, tmp_path: Path) -> None:
        """Each cache saves to safetensors and loads back bit-exactly."""
        from diffusion_templates import TemplateCache

        name = self._name()
        _, tp = self._pipelines(backbone, self._host())
        for i, cache in enumerate(self._encode(tp, backbone)):
            path = tmp_path / f"{i}-{cache.carrier}.safetensors"
            try:
                cache.save(path)
                loaded = TemplateCache.load(path)
            except Exception as exc:
                _fail(f"the {cache.carrier!r} cache of template {name!r} does not save/load: {_error(exc)}")
            diffs = cache_differences(cache, loaded)
            if diffs:
                _fail(f"the {cache.carrier!r} cache of template {name!r} did not round-trip through "
                      "save/load bit-exactly: " + "; ".join(diffs))

    # -- injection -----------------------------------------------------------------------------------------
    def test_injection_changes_output_and_is_undone(self, backbone: str) -> None:
        name = self._name()
        pipe, tp = self._pipelines(backbone, self._host())
        baseline = self._pooled(backbone).baseline
        shaped = self._templated_call(tp, backbone, f"a call with template {name!r}",
                                      templates=[self._spec()])
        self._check_unchanged(backbone, "after a call")
        after = self._call(pipe, backbone)
        if not torch_equal(after, baseline):
            _fail(f"template {name!r} left the pipeline changed on backbone {backbone!r}: without "
                  "templates it now gives a different output than before the call (max |diff| "
                  f"{max_diff(after, baseline):.3g})")
        if torch_equal(shaped, baseline):
            _fail(f"template {name!r} did not change the output on backbone {backbone!r}: the call with "
                  f"{self._valid()[0]!r} gave exactly the output without it (does the cache reach layers the "
                  "pipeline runs? is the untrained model a no-op, e.g. a LoRA with B = 0?)")

    def test_injection_is_undone_when_the_call_fails(self, backbone: str) -> None:
        name = self._name()
        _, tp = self._pipelines(backbone, self._host())

        def stop(*args: Any, **kwargs: Any) -> dict[str, Any]:
            raise _StopCall("the conformance kit stops this call half way")

        try:
            self._call(tp, backbone, templates=[self._spec()], callback_on_step_end=stop)
        except _StopCall:
            pass
        except Exception as exc:
            _fail(f"a call with template {name!r} on backbone {backbone!r} failed before its first step "
                  f"completed: {_error(exc)}")
        else:
            pytest.skip(f"the {backbone!r} pipeline did not run the step callback")
        self._check_unchanged(backbone, "after a call that raised")

    def test_composes_with_another_template(self, backbone: str) -> None:
        """With the kit's companion template (same carrier if it can): merges, both act, undone."""
        from .companion import CARRIERS, COMPANION

        name = self._name()
        host = self._host()
        plugin = self._plugin(host)
        _, tp = self._pipelines(backbone, host)
        carrier = next((c for c in getattr(plugin, "carriers", ()) if c in CARRIERS), "kv")
        if not host.get("carrier", carrier).supports(tp.adapter):
            pytest.skip(f"backbone {backbone!r} does not support the companion's {carrier!r} carrier")
        spec, companion = self._spec(), {"template": COMPANION, "carrier": carrier}
        what = f"template {name!r} composed with another {carrier!r} template ({COMPANION})"
        alone = self._templated_call(tp, backbone, f"a call with template {name!r}", templates=[spec])
        both = self._templated_call(tp, backbone, what, templates=[spec, companion])
        self._templated_call(tp, backbone, what + " listed first", templates=[companion, spec])
        other = self._templated_call(tp, backbone, f"a call with {COMPANION}", templates=[companion])
        self._check_unchanged(backbone, "after calls composed with another template")
        if torch_equal(both, other):
            _fail(f"template {name!r} had no effect when composed with another {carrier!r} template on "
                  f"backbone {backbone!r}: the output equals the other template's alone")
        if torch_equal(both, alone):
            _fail(f"another {carrier!r} template had no effect when composed with template {name!r} on "
                  f"backbone {backbone!r}: the output equals template {name!r} alone (does its injection "
                  "hide others?)")

    # -- Template model safety ------------------------------------------------------------------------------
    def _model(self) -> tuple[type, Any]:
        from diffusion_templates import TemplateModel

        name = self._name()
        cls = self.model_class or getattr(self._plugin(self._host()), "Model", None)
        if cls is None:
            pytest.skip(f"template {name!r} declares no Template model: set `Model = YourModel` on the "
                        "plugin class or `model_class` on this test class")
        if not (inspect.isclass(cls) and issubclass(cls, TemplateModel)):
            _fail(f"{cls!r} (the Template model of {name!r}) is not a diffusion_templates.TemplateModel "
                  "subclass: Template models must be, so that loading refuses code and reads only "
                  "safetensors")
        try:
            return cls, cls(**self.model_kwargs)
        except Exception as exc:
            _fail(f"could not build {cls.__name__}(**{dict(self.model_kwargs)!r}): {_error(exc)}; set "
                  "`model_kwargs` on the test class to arguments that build a small model")

    def test_model_saves_and_loads_safetensors(self, tmp_path: Path) -> None:
        import torch

        cls, model = self._model()
        folder = tmp_path / "weights"
        model.save_pretrained(folder)
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        other = [f for f in files if not f.endswith((".json", ".safetensors"))]
        if other or not any(f.endswith(".safetensors") for f in files):
            _fail(f"{cls.__name__}.save_pretrained wrote {files}: a weights folder must hold config.json and "
                  ".safetensors files only")
        loaded = cls.from_pretrained(folder)
        a, b = model.state_dict(), loaded.state_dict()
        diffs = sorted(set(a) ^ set(b)) + [k for k in sorted(set(a) & set(b)) if not (
            a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(_bits(a[k]), _bits(b[k])))]
        if diffs:
            _fail(f"{cls.__name__} did not round-trip through save_pretrained/from_pretrained bit-exactly: "
                  f"{', '.join(diffs[:10])}")
        config_a = {k: v for k, v in model.config.items() if not k.startswith("_")}
        config_b = {k: v for k, v in loaded.config.items() if not k.startswith("_")}
        if config_a != config_b:
            _fail(f"{cls.__name__}: the config changed through save_pretrained/from_pretrained: "
                  f"{_short(config_a)} -> {_short(config_b)}")

    def test_model_refuses_pickled_weights(self, tmp_path: Path) -> None:
        import torch

        cls, model = self._model()
        folder = tmp_path / "pickled"
        model.save_pretrained(folder)
        for path in folder.glob("*.safetensors"):
            path.unlink()
        # A plain state dict: even a loader that unpickles "safely" (weights_only) would accept it.
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
                   folder / "diffusion_pytorch_model.bin")
        try:
            cls.from_pretrained(folder)
        except Exception:
            return
        _fail(f"{cls.__name__}.from_pretrained loaded pickled weights (diffusion_pytorch_model.bin): "
              "Template models must read safetensors only")

    def test_model_refuses_folder_with_code(self, tmp_path: Path) -> None:
        from diffusion_templates import TemplateError

        cls, model = self._model()
        folder = tmp_path / "with-code"
        model.save_pretrained(folder)
        marker = tmp_path / "executed-marker"
        (folder / "model.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
        try:
            cls.from_pretrained(folder)
        except TemplateError as exc:
            if "model.py" not in str(exc):
                _fail(f"{cls.__name__}.from_pretrained refused a folder with model.py without naming it: "
                      f"{exc}")
        except Exception as exc:
            _fail(f"{cls.__name__}.from_pretrained raised {_error(exc)} for a folder with model.py, not the "
                  "TemplateError that diffusion_templates.TemplateModel.from_pretrained raises")
        else:
            _fail(f"{cls.__name__}.from_pretrained loaded a folder containing model.py: it must refuse "
                  "folders with code (diffusion_templates.TemplateModel.from_pretrained does; do not "
                  "bypass it)")
        if marker.exists():
            _fail(f"{cls.__name__}.from_pretrained executed model.py from the weights folder")


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype and bool(torch.equal(a, b))


def max_diff(a: Any, b: Any) -> float:
    if tuple(a.shape) != tuple(b.shape):
        return float("inf")
    return float((a.double() - b.double()).abs().max())


def _is_numeric(annotation: Any) -> bool:
    """int/float/bool, or an optional or union of them (strings could be legitimate values)."""
    import types
    import typing

    if annotation in (int, float, bool):
        return True
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if args and origin in (typing.Union, types.UnionType):
        real = [a for a in args if a is not type(None)]
        return bool(real) and all(a in (int, float, bool) for a in real)
    return False
