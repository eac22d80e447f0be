"""Applying changes to a running base model and undoing them exactly.

Every carrier changes the model only through an :class:`Injection`: applied on enter, undone on
exit, whatever happened in between. Module-level changes go through :class:`HookSet`, which
registers diffusers ``ModelHook`` objects and, on removal, also drops what diffusers' own
``remove_hook`` leaves behind (an instance ``forward`` attribute and an empty ``_diffusers_hook``
registry), so the module's ``__dict__`` is what it was. Weights are never written.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .context import BatchLayout, CallState

_hook_ids = itertools.count()


def unique_hook_name(kind: str) -> str:
    """A registry name no other injection uses (the same carrier may be injected twice, per branch)."""
    return f"diffusion_templates.{kind}.{next(_hook_ids)}"


class Injection:
    """A change to the running base model. Subclasses implement :meth:`apply` and :meth:`remove`.

    ``remove`` is called exactly once after a successful ``apply``, also when the call raised.
    A carrier that needs to change the pipeline call itself (prompt embeddings, latents, a step
    callback) overrides :meth:`update_call_kwargs`; the pipeline calls it after ``apply``.
    """

    def apply(self) -> None:
        """Install the change."""

    def remove(self) -> None:
        """Undo :meth:`apply` exactly."""

    #: Tensors this injection reads or replaces in :meth:`on_step_end` (the pipeline's
    #: ``callback_on_step_end_tensor_inputs`` names, e.g. ``("latents",)``).
    step_tensor_inputs: tuple[str, ...] = ()

    def update_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return kwargs

    def on_step_end(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        """Called after each denoising step with the requested tensors; return the replacements.

        Only called when ``step_tensor_inputs`` is non-empty. Step callbacks of all injections run
        in injection order, then the user's own ``callback_on_step_end``.
        """
        return {}

    def __enter__(self) -> Injection:
        try:
            self.apply()
        except BaseException:  # a half-applied injection is undone too (exit is not called then)
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class HookSet:
    """diffusers ModelHooks registered on modules, removed leaving each module as it was."""

    def __init__(self) -> None:
        self._installed: list[tuple[torch.nn.Module, str, bool, bool]] = []

    def add(self, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
        had_forward = "forward" in module.__dict__
        had_registry = "_diffusers_hook" in module.__dict__
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        self._installed.append((module, name, had_forward, had_registry))

    def remove_all(self) -> None:
        while self._installed:
            module, name, had_forward, had_registry = self._installed.pop()
            registry: HookRegistry = module._diffusers_hook
            registry.remove_hook(name, recurse=False)
            if not had_forward:
                module.__dict__.pop("forward", None)
            if not had_registry and not registry.hooks:
                del module._diffusers_hook


_WALK_LIMIT = 1 << 20


def _registry_modules(root: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules under ``root`` (itself included) that hold a diffusers hook registry.

    The same modules as ``[m for m in root.modules() if "_diffusers_hook" in m.__dict__]``, found by
    reading the ``_modules`` dicts directly: ``Module.modules()`` builds a name for every module and
    keeps a memo set, which made this walk the largest part of a templated call's fixed cost on
    small models. A module shared by two parents may come twice (harmless here); a module graph
    with a cycle, which ``modules()`` tolerates, falls back to ``modules()``.
    """
    stack: list[Any] = [root]
    extend = stack.extend
    for count, module in enumerate(stack):
        if module is not None:
            if count > _WALK_LIMIT:
                return [m for m in root.modules() if m.__dict__.get("_diffusers_hook") is not None]
            extend(module.__dict__["_modules"].values())
    return [m for m in stack if m is not None and m.__dict__.get("_diffusers_hook") is not None]


_MISSING = object()


@contextlib.contextmanager
def registry_cache_guard(root: torch.nn.Module) -> Iterator[None]:
    """Restore diffusers' cached child-registry lists under ``root`` after a call.

    ``_set_cache_context`` caches, per registry, the list of child registries. Hooks that a call
    adds on submodules would stay referenced from that cache after their removal; the guard puts
    back exactly what each registry cached before (and removes a root registry that diffusers'
    ``cache_context`` created during the call).

    The registries are found by walking the module tree at every call, so hooks added or removed
    between calls by anyone are always seen (a cached list could not notice a registry created by
    hand on a submodule). After the call only those registries and the root's are looked at:
    registries created during the call are either removed by the ``HookSet`` that created them
    or diffusers' root registry (diffusers builds the child-registry cache only on the module
    whose ``cache_context`` runs, the denoiser).
    """
    before: list[tuple[torch.nn.Module, Any]] = [
        (module, module.__dict__["_diffusers_hook"].__dict__.get("_child_registries_cache", _MISSING))
        for module in _registry_modules(root)
    ]
    root_had_registry = "_diffusers_hook" in root.__dict__
    try:
        yield
    finally:
        for module, cached in before:
            registry = module.__dict__.get("_diffusers_hook")
            if registry is None:
                continue
            if cached is _MISSING:
                registry.__dict__.pop("_child_registries_cache", None)
            else:
                registry._child_registries_cache = cached
        if not root_had_registry:
            registry = root.__dict__.get("_diffusers_hook")
            if registry is not None:
                if registry.hooks:
                    registry.__dict__.pop("_child_registries_cache", None)
                else:
                    del root._diffusers_hook


class _NoState(BaseState):
    def reset(self, *args: Any, **kwargs: Any) -> None:
        pass


class PerThreadContext(StateManager):
    """A StateManager whose cache context is per thread (a context variable).

    diffusers' ``cache_context`` stores the context on the hooks' state managers, i.e. on the shared
    module; a bare call of the same pipeline in another thread would overwrite the name our call
    reads. Each thread sets and reads its own here.
    """

    def __init__(self) -> None:
        super().__init__(_NoState)
        self._context_var: ContextVar = ContextVar("dt_cache_context", default=None)

    def set_context(self, context: Any) -> None:
        self._context_var.set(context)

    @property
    def current(self) -> Any:
        return self._context_var.get()


class _BranchHook(ModelHook):
    """Sets ``call.layout`` (and ``call.branch``) at every denoiser call, from that call alone."""

    _is_stateful = True  # so that ``transformer.cache_context`` hands this hook its context

    def __init__(self, call: CallState, adapter: Any, images: int | None):
        super().__init__()
        self.call = call
        self.adapter = adapter
        self.images = images
        self.state_manager = PerThreadContext()

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any):
        if not self.call.active:
            return args, kwargs
        context = self.state_manager.current
        name = context.name if context is not None else None
        layout = denoiser_layout(self.adapter, self.call, self.images, name, args, kwargs)
        self.call.layout = layout
        self.call.branch = layout.whole or "batched"  # type: ignore[assignment]
        self.call.denoiser_calls += 1
        if layout.rows_of("uncond") is not None:
            self.call.extras["saw_uncond"] = True
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module


def denoiser_layout(
    adapter: Any, call: CallState, images: int | None, context: str | None, args: tuple, kwargs: dict
) -> BatchLayout:
    """The rows per branch of one denoiser call: ``call.fixed_layout`` when the caller set one, else
    what the adapter makes of this call's batch, the call's image count and the cache-context name.

    Denoiser hooks registered after the tracker run their ``pre_forward`` before it (diffusers wraps
    later hooks outside earlier ones), so such a hook computes the layout with this same function
    instead of reading ``call.layout``."""
    batch = _call_batch(args, kwargs)
    fixed = call.fixed_layout
    if fixed is not None:
        if fixed.batch != batch:
            raise ValueError(
                f"call.fixed_layout covers a batch of {fixed.batch}, the denoiser call has {batch} rows"
            )
        return fixed
    return adapter.batch_layout(batch, images, context, kwargs)


def _call_batch(args: tuple, kwargs: dict[str, Any]) -> int:
    """The batch size of a denoiser call: its first tensor argument's first dimension."""
    sample = kwargs.get("hidden_states", kwargs.get("sample"))
    if sample is None:
        sample = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if sample is None:
        sample = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    return int(sample.shape[0]) if isinstance(sample, torch.Tensor) and sample.ndim else 0


class BranchTracker(Injection):
    """Keeps ``call.layout``/``call.branch`` equal to the rows per CFG branch of each denoiser call."""

    def __init__(self, adapter: Any, call: CallState):
        self.adapter = adapter
        self.call = call
        self.hooks = HookSet()

    def apply(self) -> None:
        # The image count comes from the pipeline call's own arguments. Direct calls (``injecting()``)
        # have no pipeline deciding their rows: without an image count each is one branch as a whole.
        images = None if self.call.direct else self.adapter.images_of_call(self.call.kwargs)
        self.call.layout = None
        hook = _BranchHook(self.call, self.adapter, images)
        self.hooks.add(self.adapter.denoiser, hook, unique_hook_name("branch"))

    def remove(self) -> None:
        self.hooks.remove_all()


def compose_step_callbacks(injections: list[Injection], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Fold the injections' ``on_step_end`` and the user's ``callback_on_step_end`` into one callback.

    diffusers pipelines take a single ``callback_on_step_end`` and the list of tensor names it may
    read and replace; several carriers (latent masks, guidance) and the user all need it.
    """
    active = [i for i in injections if i.step_tensor_inputs]
    if not active:
        return kwargs
    user_callback = kwargs.get("callback_on_step_end")
    names = list(kwargs.get("callback_on_step_end_tensor_inputs") or ["latents"])
    for injection in active:
        names += [n for n in injection.step_tensor_inputs if n not in names]

    def callback(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        tensors = dict(tensors)
        for injection in active:
            tensors.update(injection.on_step_end(pipe, step, timestep, tensors) or {})
        if user_callback is not None:
            tensors.update(user_callback(pipe, step, timestep, tensors) or {})
        return tensors

    return {**kwargs, "callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": names}
