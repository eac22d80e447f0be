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
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .context import CallState

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

    def update_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return kwargs

    def __enter__(self) -> Injection:
        self.apply()
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


@contextlib.contextmanager
def registry_cache_guard(root: torch.nn.Module) -> Iterator[None]:
    """Restore diffusers' cached child-registry lists under ``root`` after a call.

    ``_set_cache_context`` caches, per registry, the list of child registries. Hooks that a call
    adds on submodules would stay referenced from that cache after their removal; the guard puts
    back exactly what each registry cached before (and removes a root registry that diffusers'
    ``cache_context`` created during the call).
    """
    before: dict[int, tuple[torch.nn.Module, bool, Any]] = {}
    for module in root.modules():
        registry = module.__dict__.get("_diffusers_hook")
        if registry is not None:
            has_cache = "_child_registries_cache" in registry.__dict__
            before[id(module)] = (module, has_cache, registry.__dict__.get("_child_registries_cache"))
    root_had_registry = "_diffusers_hook" in root.__dict__
    try:
        yield
    finally:
        for module in root.modules():
            registry = module.__dict__.get("_diffusers_hook")
            if registry is None:
                continue
            if id(module) not in before:
                if module is root and not root_had_registry and not registry.hooks:
                    del root._diffusers_hook
                else:
                    registry.__dict__.pop("_child_registries_cache", None)
                continue
            _, has_cache, cached = before[id(module)]
            if has_cache:
                registry._child_registries_cache = cached
            else:
                registry.__dict__.pop("_child_registries_cache", None)


class _NoState(BaseState):
    def reset(self, *args: Any, **kwargs: Any) -> None:
        pass


class _BranchHook(ModelHook):
    """Reads diffusers' cache context ("cond"/"uncond") at every denoiser call."""

    _is_stateful = True  # so that ``transformer.cache_context`` hands this hook its context

    def __init__(self, call: CallState):
        super().__init__()
        self.call = call
        self.state_manager = StateManager(_NoState)

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any):
        context = self.state_manager._context
        self.call.branch = "uncond" if context is not None and context.name == "uncond" else "cond"
        self.call.denoiser_calls += 1
        if self.call.branch == "uncond":
            self.call.extras["saw_uncond"] = True
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module


class BranchTracker(Injection):
    """Keeps ``call.branch`` equal to the CFG branch the denoiser is computing."""

    def __init__(self, denoiser: torch.nn.Module, call: CallState):
        self.denoiser = denoiser
        self.call = call
        self.hooks = HookSet()

    def apply(self) -> None:
        self.hooks.add(self.denoiser, _BranchHook(self.call), unique_hook_name("branch"))

    def remove(self) -> None:
        self.hooks.remove_all()
