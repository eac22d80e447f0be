"""TemplatePipeline: a diffusers pipeline with Template caches injected for one call.

One call, start to finish (``TemplatePipeline.__call__``):

1. ``resolve``   each template spec is validated against its plugin's ``Inputs`` schema;
2. ``encode``    the plugin's ``encode`` hook runs its Template model, ``to_cache`` types the result;
3. ``merge``     caches are grouped per carrier (positive and negative separately) and merged;
4. ``inject``    each carrier's ``inject`` hook checks its merged cache against the backbone and
                 returns an un-applied Injection;
5. run           the injections are applied, the wrapped pipeline runs unchanged, and every
                 injection is undone on the way out, also when the call raised.

Everything that can fail on bad input fails in steps 1-4, before the model is touched.

``TemplatePipeline.injecting(templates=...)`` runs steps 1-4 and applies the injections for a
``with`` block instead of a pipeline call: direct denoiser calls inside it (a training loop, a custom
sampler) see the templates, with the same lock and the same exact undo as ``__call__``.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from .cache import TemplateCache
from .context import CURRENT_CALL, CallState, EncodeContext, InjectionTarget
from .errors import PluginError, TemplateInputError, UnsupportedError, validate_inputs
from .guard import encode_guard
from .injection import BranchTracker, Injection, compose_step_callbacks, registry_cache_guard
from .locks import component_lock, pipeline_lock
from .plugins import PluginHost, default_host

TemplateSpec = Mapping[str, Any] | str | TemplateCache


def denoiser_lock(denoiser: Any) -> threading.RLock:
    """The denoiser's own lock (held by every call through a pipeline with this denoiser, among the
    locks of its other stateful components: ``locks.py``)."""
    return component_lock(denoiser)


def spec_list(specs: Any, argument: str) -> list[TemplateSpec]:
    """The ``templates=`` / ``negative_templates=`` argument as a list of template specs.

    One spec on its own -- a template name, a ``{"template": ...}`` mapping or a TemplateCache -- is a
    list of one, as diffusers takes ``prompt="..."`` or a list of prompts: iterating it would give its
    letters, keys or fields. Anything else that is not an iterable of specs is a TemplateInputError
    naming the argument.
    """
    if specs is None:
        return []
    if isinstance(specs, (str, Mapping, TemplateCache)):
        return [specs]
    if isinstance(specs, (bytes, bytearray)) or not isinstance(specs, Iterable):
        expected = "expected a template spec (a name, a mapping, a TemplateCache) or a list of them"
        raise TemplateInputError("<unnamed>", [(argument, expected, specs)])
    return list(specs)


@dataclass
class ResolvedTemplate:
    """A template name with its validated inputs."""

    name: str
    inputs: BaseModel


class TemplatePipeline:
    """Wraps any supported diffusers pipeline; ``__call__`` takes ``templates``/``negative_templates``.

    A template spec is ``{"template": name, **inputs}`` (or just the name, or an already computed
    :class:`TemplateCache`). Every other argument goes to the wrapped pipeline unchanged, and its
    own output type comes back. Attribute access falls through to the wrapped pipeline.
    """

    def __init__(
        self,
        pipe: Any,
        *,
        plugins: PluginHost | None = None,
        store: Any = "default",
        lora_fusion: str = "off",
    ):
        """``store``: where computed caches are kept and reused (``store.py``); default an in-memory
        ``TemplateCacheStore()`` of 512 MiB for this pipeline, ``None`` computes every time.

        ``lora_fusion``: ``"off"`` (default) runs LoRA caches unfused, as hooks; ``"auto"`` writes
        them into the weights for calls of at least ``carriers.lora.FUSE_MIN_STEPS`` steps where
        the LoRA reaches every denoiser call (no CFG branch it must miss), restoring the weights from
        a copy afterwards; ``"on"`` fuses whenever that is exact. Fused weights are visible to raw
        diffusers calls of the same modules from other threads while the call runs.
        """
        from .carriers.lora import LORA_FUSION_MODES
        from .store import TemplateCacheStore

        if lora_fusion not in LORA_FUSION_MODES:
            raise ValueError(f"lora_fusion must be one of {LORA_FUSION_MODES}, got {lora_fusion!r}")
        self.lora_fusion = lora_fusion
        self._checked: dict[str, Any] = {}  # template name -> plugin object whose backbone check passed

        self.pipe = pipe
        self.plugins = plugins or default_host()
        self.adapter = self.plugins.adapter_for(pipe)
        self.store = TemplateCacheStore() if isinstance(store, str) and store == "default" else store

    def __getattr__(self, name: str) -> Any:
        if name == "pipe":
            raise AttributeError(name)
        return getattr(self.pipe, name)

    def __repr__(self) -> str:
        return f"TemplatePipeline({type(self.pipe).__name__}, backbone={self.adapter.name!r})"

    # -- discovery ------------------------------------------------------------------------------------
    def available(self) -> list[dict[str, Any]]:
        """The Python form of ``dt list``: every discovered plugin with its status."""
        return [info.as_dict() for info in self.plugins.infos]

    # -- steps 1-3 --------------------------------------------------------------------------------------
    def resolve(self, spec: Mapping[str, Any] | str) -> ResolvedTemplate:
        """Validate one template spec; errors name the template and the field."""
        if isinstance(spec, str):
            spec = {"template": spec}
        if not isinstance(spec, Mapping) or "template" not in spec:
            raise TemplateInputError(
                "<unnamed>", [("template", "each template spec needs a 'template' name", spec)]
            )
        name = spec["template"]
        if not isinstance(name, str):
            raise TemplateInputError("<unnamed>", [("template", "a template name must be a string", name)])
        plugin = self.plugins.get("template", name)
        fields = {k: v for k, v in spec.items() if k != "template"}
        try:
            inputs = validate_inputs(name, plugin.Inputs, fields)
        except TemplateInputError:
            raise
        except Exception as exc:  # the plugin's own validator crashed on this input (e.g. OSError)
            problem = f"the template's input validation raised {type(exc).__name__}: {exc}"
            raise TemplateInputError(name, [("<inputs>", problem, fields)]) from exc
        if self._checked.get(name) is not plugin:  # once per plugin object: it is on every call's path
            self._check_backbone(name, plugin)
            self._checked[name] = plugin
        return ResolvedTemplate(name, inputs)

    def _check_backbone(self, name: str, plugin: Any) -> None:
        backbones = tuple(getattr(plugin, "backbones", ("*",)))
        if "*" not in backbones and self.adapter.name not in backbones:
            raise UnsupportedError(
                f"template {name!r} supports backbones {list(backbones)}, not {self.adapter.name!r}"
            )
        for carrier in getattr(plugin, "carriers", ()):
            self._check_carrier(carrier, f"template {name!r}")

    def _check_carrier(self, carrier: str, who: str) -> None:
        obj = self.plugins.get("carrier", carrier)
        if not obj.supports(self.adapter):
            raise UnsupportedError(
                f"{who} needs carrier {carrier!r}, which backbone {self.adapter.name!r} "
                f"does not support (it supports {sorted(self.adapter.carriers)})"
            )

    def encode(self, spec: TemplateSpec, *, negative: bool = False) -> list[TemplateCache]:
        """Run one template (validate, ``encode``, ``to_cache``), or take its caches from ``self.store``."""
        if isinstance(spec, TemplateCache):
            return [spec]
        resolved = self.resolve(spec)
        if self.store is not None:
            return self.store.fetch(self, resolved, lambda: self._run(resolved, negative), negative=negative)
        return self._run(resolved, negative)

    def _run(self, resolved: ResolvedTemplate, negative: bool) -> list[TemplateCache]:
        context = EncodeContext(
            pipe=self.pipe, adapter=self.adapter, template=resolved.name, negative=negative
        )
        info = self.plugins.info("template", resolved.name)
        # The plugin gets the pipeline to read it; whatever it changed is undone and refused (guard.py).
        with encode_guard(self.pipe, plugin=resolved.name, distribution=info.distribution if info else None):
            rep = self.plugins.call(
                "template",
                resolved.name,
                "encode",
                template=resolved.name,
                inputs=resolved.inputs,
                context=context,
            )
            if rep is None:
                raise self._plugin_error("template", resolved.name, "encode returned nothing")
            caches = self.plugins.call(
                "template",
                resolved.name,
                "to_cache",
                template=resolved.name,
                representation=rep,
                context=context,
            )
        if isinstance(caches, TemplateCache):
            caches = [caches]
        if (
            not isinstance(caches, (list, tuple))
            or not caches
            or not all(isinstance(c, TemplateCache) for c in caches)
        ):
            got = (
                (", ".join(type(c).__name__ for c in caches) or "nothing")
                if isinstance(caches, (list, tuple))
                else type(caches).__name__
            )
            raise self._plugin_error(
                "template", resolved.name, f"to_cache must return TemplateCache objects, returned {got}"
            )
        caches = list(caches)
        return [c if c.template else c.model_copy(update={"template": resolved.name}) for c in caches]

    def merge(self, caches: Sequence[TemplateCache]) -> list[TemplateCache]:
        """Group caches by carrier and merge each group (one cache per carrier comes back)."""
        groups: dict[str, list[TemplateCache]] = {}
        for cache in caches:
            groups.setdefault(cache.carrier, []).append(cache)
        merged = []
        for carrier, group in groups.items():
            self._check_carrier(carrier, f"cache from template {group[0].template!r}")
            if len(group) == 1:
                merged.append(group[0])
            else:
                cache = self.plugins.call("carrier", carrier, "merge", carrier=carrier, caches=group)
                if not isinstance(cache, TemplateCache) or cache.carrier != carrier:
                    got = getattr(cache, "carrier", None) or type(cache).__name__
                    raise self._plugin_error(
                        "carrier", carrier, f"merge must return a {carrier!r} cache, got {got}"
                    )
                merged.append(cache)
        return merged

    def _plugin_error(self, kind: str, name: str, message: str) -> PluginError:
        info = self.plugins.info(kind, name)
        return PluginError(message, plugin=name, distribution=info.distribution if info else None)

    def prepare(
        self,
        templates: Iterable[TemplateSpec] = (),
        negative_templates: Iterable[TemplateSpec] = (),
        call: CallState | None = None,
    ) -> list[Injection]:
        """Steps 1-4 for a call: the un-applied injections, in application order."""
        call = call or CallState()
        injections: list[Injection] = []
        for branch, specs in (("cond", templates), ("uncond", negative_templates)):
            argument = "templates" if branch == "cond" else "negative_templates"
            specs = spec_list(specs, argument)
            caches = [c for spec in specs for c in self.encode(spec, negative=branch == "uncond")]
            target = InjectionTarget(pipe=self.pipe, adapter=self.adapter, branch=branch, call=call)
            for cache in self.merge(caches):
                injection = self.plugins.call(
                    "carrier", cache.carrier, "inject", carrier=cache.carrier, cache=cache, target=target
                )
                if not isinstance(injection, Injection):
                    raise self._plugin_error(
                        "carrier",
                        cache.carrier,
                        f"inject must return an Injection, got {type(injection).__name__}",
                    )
                injections.append(injection)
        return injections

    # -- step 5 ---------------------------------------------------------------------------------------------
    def __call__(
        self,
        *args: Any,
        templates: Iterable[TemplateSpec] | None = None,
        negative_templates: Iterable[TemplateSpec] | None = None,
        **kwargs: Any,
    ) -> Any:
        if args:  # carriers read and rewrite the call's arguments by name
            bound = inspect.signature(self.pipe.__call__).bind_partial(*args, **kwargs)
            args, kwargs = (), dict(bound.arguments)
        call = CallState(kwargs=dict(kwargs), extras={"lora_fusion": self.lora_fusion})
        # Encoding runs under the locks too: template models may run the pipeline's VAE and text
        # encoders, and some keep per-call state on their modules (Qwen-Image's VAE caches).
        with pipeline_lock(self.pipe, self.adapter.denoiser):
            injections = self.prepare(templates or (), negative_templates or (), call)
            if not injections:  # still serialised: the scheduler and tokenizers keep per-call state
                return self.pipe(*args, **kwargs)

            def update(injection: Injection) -> None:  # right after each apply, as before the refactor
                nonlocal kwargs
                kwargs = injection.update_call_kwargs(kwargs)

            with self._applied(injections, call, after_apply=update):
                kwargs = compose_step_callbacks(injections, kwargs)
                output = self.pipe(*args, **kwargs)
        if negative_templates and not call.extras.get("saw_uncond"):
            warnings.warn(
                "negative_templates had no effect: the pipeline ran no unconditional (CFG) branch; "
                "enable real classifier-free guidance to use them",
                stacklevel=2,
            )
        return output

    @contextlib.contextmanager
    def injecting(
        self,
        templates: Iterable[TemplateSpec] = (),
        negative_templates: Iterable[TemplateSpec] = (),
        *,
        call_kwargs: Mapping[str, Any] | None = None,
    ) -> Iterator[CallState]:
        """Inject templates for direct denoiser calls made inside the block (training, custom samplers).

        ``with pipe.injecting(templates=[...]) as call: pipe.transformer(...)``: the same steps 1-4
        and guarantees as ``__call__`` (validated before anything is patched; the pipeline's locks held;
        every change undone exactly on exit, also on exceptions), but no pipeline call. A denoiser call
        outside ``transformer.cache_context("uncond")`` counts as the conditional branch (or as the
        yielded ``call.fixed_layout`` says, e.g. ``BatchLayout.cfg(n)``). Tensors of
        ready :class:`TemplateCache` objects keep their autograd graph, so a loss computed in the block
        back-propagates into whatever produced them; call ``backward()`` inside the block (gradient
        checkpointing recomputes the forward then, and the injection must still be there).
        ``call_kwargs``: what ``inject`` checks see as the call's arguments (e.g. ``height``).
        Carriers that act through the pipeline's own arguments or step callbacks (embedding,
        latent_mask, init_latents, guidance, residual) need ``__call__`` and are refused here.
        """
        call = CallState(kwargs=dict(call_kwargs or {}), direct=True)
        with pipeline_lock(self.pipe, self.adapter.denoiser):
            injections = self.prepare(templates or (), negative_templates or (), call)
            for injection in injections:
                if injection.step_tensor_inputs or (
                    type(injection).update_call_kwargs is not Injection.update_call_kwargs
                ):
                    raise UnsupportedError(
                        f"{type(injection).__name__} changes the pipeline call's arguments or steps, so it "
                        "only works through TemplatePipeline.__call__, not injecting()"
                    )
            with self._applied(injections, call):
                yield call

    @contextlib.contextmanager
    def _applied(
        self,
        injections: list[Injection],
        call: CallState,
        after_apply: Callable[[Injection], None] | None = None,
    ) -> Iterator[None]:
        """The injections applied with ``call`` current; all undone in reverse order on exit."""
        token = CURRENT_CALL.set(call)
        with contextlib.ExitStack() as stack:
            stack.callback(CURRENT_CALL.reset, token)
            stack.enter_context(registry_cache_guard(self.adapter.denoiser))
            stack.enter_context(BranchTracker(self.adapter, call))
            for injection in injections:
                stack.enter_context(injection)
                if after_apply is not None:
                    after_apply(injection)
            yield
