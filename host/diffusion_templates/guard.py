"""What a template plugin's ``encode`` may not do to the pipeline, checked around every encode.

``encode`` gets the pipeline (``EncodeContext.pipe``) to run its text encoders or VAE, not to change
it. :func:`encode_guard` records, before the plugin's ``encode``/``to_cache`` run, a cheap
fingerprint of everything a change would show in, and compares after:

* every parameter and buffer of every module component: its object, ``_version`` counter (bumped by
  every in-place write through the tensor or a view of it), storage pointer and ``requires_grad``;
* per submodule: ``training``, an instance ``forward`` (a monkeypatch, or a diffusers hook), its
  attention ``processor``, its diffusers hook registry and its children;
* torch hooks, on any module of the pipeline or global: torch numbers every hook it registers from
  one counter, so an unchanged counter means no hook was added, and the new ones are those numbered
  from the counter's value before;
* each component object, and each component's diffusers config (the scheduler's, the models'),
  which ``register_to_config`` replaces.

Any change is refused: the host raises :class:`PluginError` naming the plugin and its distribution
and listing the changes. Before raising, it undoes every change it can undo exactly from what it
recorded (training flags, ``requires_grad``, configs, replaced components, tensors or submodules,
added hooks, processors, instance ``forward``), so the pipeline is as before. What it cannot undo
is a write into a tensor's memory (an in-place op, ``.to()`` of a module): the fingerprint keeps no
copy of the values (that would cost the model's size per encode), so the error names those tensors
as changed for good. Hooks transformers installs on a model's first hidden-states request are no
change (:data:`_LIBRARY_LAZY_HOOKS`).

Not seen: writes through ``tensor.data`` (a view that does not share the version counter) and
writes inside kernels that bypass autograd's counter; torch hooks removed, or put into a module's
hook dicts without ``register_*``; changes to other objects the pipeline holds (a tokenizer's
vocabulary or padding side); changes made from another thread after the encode returned. The cost
is one walk over the modules before and one after (numbers in docs/reliability.md); it runs only
when an encode runs, i.e. on a cache-store miss.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin
from torch.nn.modules import module as torch_module
from torch.utils.hooks import RemovableHandle

from .errors import PluginError
from .locks import pipeline_components

#: The per-module hook dicts of torch. Their keys are ``RemovableHandle`` ids, drawn from one counter
#: (``RemovableHandle.next_id``) by every ``register_*hook`` call: a hook registered during the encode
#: has an id at or above the counter's value before it, and unchanged counter means none was added.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called",
    "_global_forward_hooks_with_kwargs",
)
_MISSING = object()
_hook_dicts = operator.itemgetter(*_HOOK_DICTS)

#: Hooks a library installs on a model the first time it is used in some way, and keeps: transformers 5
#: puts an output-capturing forward hook on each layer the first time hidden states are requested
#: (``transformers.utils.output_capturing``, marking the model ``_output_capturing_hooks_installed``).
#: An encode that asks the pipeline's text encoder for hidden states first does exactly what the
#: pipeline's own call would do; removing the hooks would leave the model marked but unhooked.
_LIBRARY_LAZY_HOOKS = frozenset(
    {("transformers.utils.output_capturing", "install_output_capuring_hook.<locals>.output_capturing_hook")}
)


def _tensor_state(tensor: torch.Tensor | None) -> tuple | None:
    """(object, version counter, storage, requires_grad): a write or a replacement changes one."""
    if tensor is None:
        return None
    return (id(tensor), tensor._version, tensor.data_ptr(), tensor.requires_grad)


def _key(d: dict[str, Any]) -> tuple:
    """The comparable state of the module whose ``__dict__`` is ``d`` (ids stand for tensors, whose
    ``==`` is elementwise), built as one flat tuple so that the check after an encode copies nothing."""
    registry = d.get("_diffusers_hook")
    return (
        d.get("training"),
        id(d.get("forward", _MISSING)),
        id(d.get("processor", _MISSING)),
        id(registry),
        None if registry is None else tuple(registry._hook_order),
        tuple(d["_modules"].items()),
        tuple(map(_tensor_state, d["_parameters"].values())),
        tuple(map(_tensor_state, d["_buffers"].values())),
    )


class _ModuleRecord:
    """One submodule before the encode: its ``key`` (compared) and the objects to put back."""

    __slots__ = ("module", "path", "key", "forward", "processor", "registry", "parameters", "buffers")

    def __init__(self, module: torch.nn.Module, path: str) -> None:
        d = module.__dict__
        self.module, self.path, self.key = module, path, _key(d)
        self.forward, self.processor = d.get("forward", _MISSING), d.get("processor", _MISSING)
        self.registry = d.get("_diffusers_hook")
        self.parameters, self.buffers = dict(d["_parameters"]), dict(d["_buffers"])

    @property
    def training(self) -> bool:
        return self.key[0]

    @property
    def registry_order(self) -> tuple | None:
        return self.key[4]

    @property
    def children(self) -> dict[str, Any]:
        return dict(self.key[5])


def _walk(root: torch.nn.Module, prefix: str) -> list[_ModuleRecord]:
    """Every submodule under ``root`` (itself first), depth first, read from ``_modules`` directly."""
    out, stack, seen = [], [(prefix, root)], set()
    while stack:
        path, module = stack.pop()
        if id(module) in seen:  # a module shared by two parents (tied weights): once
            continue
        seen.add(id(module))
        out.append(_ModuleRecord(module, path))
        children = module.__dict__["_modules"]
        stack.extend((f"{path}.{name}", c) for name, c in reversed(children.items()) if c is not None)
    return out


def _next_hook_id() -> int:
    return RemovableHandle.next_id


def _is_library_hook(hook: Any) -> bool:
    return (getattr(hook, "__module__", None), getattr(hook, "__qualname__", None)) in _LIBRARY_LAZY_HOOKS


def _drop_new_hooks(dicts: tuple[dict, ...], first_new: int) -> bool:
    """Remove the hooks with handle ids >= ``first_new`` from ``dicts`` (one module's, or the global
    ones), except a library's lazy hooks (:data:`_LIBRARY_LAZY_HOOKS`); whether any was removed.
    The ``_with_kwargs``/``_always_called`` dicts map a hook's id to a flag: they follow the hook."""
    functions = {key: hook for hooks in dicts for key, hook in hooks.items() if callable(hook)}
    dropped = False
    for hooks in dicts:
        for key in [k for k in hooks if k >= first_new and not _is_library_hook(functions.get(k))]:
            del hooks[key]
            dropped = True
    return dropped


@dataclass
class Fingerprint:
    """What :func:`encode_guard` compares: taken before the encode, checked after."""

    pipe: Any
    components: dict[str, Any]
    configs: dict[str, Any]
    modules: list[_ModuleRecord]
    next_hook_id: int

    @classmethod
    def take(cls, pipe: Any) -> Fingerprint:
        components = pipeline_components(pipe)
        configs = {n: c._internal_dict for n, c in components.items() if isinstance(c, ConfigMixin)}
        modules = [
            record
            for name, comp in components.items()
            if isinstance(comp, torch.nn.Module)
            for record in _walk(comp, name)
        ]
        return cls(pipe, components, configs, modules, _next_hook_id())

    # -- compare and undo --------------------------------------------------------------------------
    def restore(self) -> tuple[list[str], list[str]]:
        """Undo every difference from now that can be undone: (undone, not undoable), described."""
        undone: list[str] = []
        stuck: list[str] = []
        for name, comp in self.components.items():
            now = getattr(self.pipe, name, None)
            if now is not comp:
                setattr(self.pipe, name, comp)
                undone.append(f"replaced component {name!r} ({type(comp).__name__} -> {type(now).__name__})")
        for name, config in self.configs.items():
            comp = self.components[name]
            if comp._internal_dict is not config:
                changed = sorted(
                    k for k in set(config) | set(comp._internal_dict)
                    if config.get(k, _MISSING) != comp._internal_dict.get(k, _MISSING)
                )  # fmt: skip
                comp._internal_dict = config
                if changed:
                    undone.append(f"changed the config of {name!r} ({', '.join(changed)})")
        if _next_hook_id() != self.next_hook_id:  # some torch hook was registered, somewhere
            global_dicts = tuple(getattr(torch_module, name) for name in _GLOBAL_HOOKS)
            if _drop_new_hooks(global_dicts, self.next_hook_id):
                undone.append("registered a global torch module hook")
            for record in self.modules:
                if _drop_new_hooks(_hook_dicts(record.module.__dict__), self.next_hook_id):
                    undone.append(f"{record.path}: registered torch hooks")
        for record in self.modules:
            now = _key(record.module.__dict__)
            if now != record.key:  # the fast path: one flat tuple per module, compared
                _restore_module(record, now, undone, stuck)
        return undone, stuck


def _restore_module(before: _ModuleRecord, now: tuple, undone: list[str], stuck: list[str]) -> None:
    path, d = before.path, before.module.__dict__
    if now[0] != before.training:
        d["training"] = before.training
        undone.append(f"{path}: set training={now[0]}")
    if now[3:5] != before.key[3:5]:
        _restore_registry(before, undone, stuck)
    if d.get("forward", _MISSING) is not before.forward:
        _put(d, "forward", before.forward)
        undone.append(f"{path}: replaced forward")
    if d.get("processor", _MISSING) is not before.processor:
        _put(d, "processor", before.processor)
        undone.append(f"{path}: swapped the attention processor")
    for kind, saved in (("_modules", before.children), ("_parameters", before.parameters),
                        ("_buffers", before.buffers)):  # fmt: skip
        current = d[kind]
        if current.keys() != saved.keys() or any(current[k] is not v for k, v in saved.items()):
            changed = sorted(k for k in current.keys() | saved.keys() if current.get(k) is not saved.get(k))
            current.clear()
            current.update(saved)
            undone.append(f"{path}: replaced {kind[1:]} {changed}")
    states = before.key[6] + before.key[7]
    for (name, tensor), state in zip(
        (*before.parameters.items(), *before.buffers.items()), states, strict=True
    ):
        if tensor is None:
            continue
        if tensor.requires_grad != state[3]:
            tensor.requires_grad_(state[3])
            undone.append(f"{path}.{name}: set requires_grad={not state[3]}")
        if _tensor_state(tensor)[:3] != state[:3]:  # its version counter or its storage moved
            stuck.append(f"{path}.{name}: written in place")


def _put(d: dict, name: str, value: Any) -> None:
    if value is _MISSING:
        d.pop(name, None)
    else:
        d[name] = value


def _restore_registry(before: _ModuleRecord, undone: list[str], stuck: list[str]) -> None:
    """Remove the diffusers hooks added during the encode (and a registry it created)."""
    module, path = before.module, before.path
    registry = module.__dict__.get("_diffusers_hook")
    if registry is not None and registry is not before.registry:
        order = list(registry._hook_order)
        for name in reversed(order):
            registry.remove_hook(name, recurse=False)
        del module.__dict__["_diffusers_hook"]
        if before.registry is not None:
            module.__dict__["_diffusers_hook"] = before.registry
            stuck.append(f"{path}: replaced its diffusers hook registry (put back)")
        if order:
            undone.append(f"{path}: registered diffusers hooks {order}")
        # an empty registry is what diffusers' own ``cache_context`` leaves on a denoiser: not reported
    elif registry is not None:
        kept = set(before.registry_order or ())
        added = [name for name in registry._hook_order if name not in kept]
        for name in reversed(added):
            registry.remove_hook(name, recurse=False)
        if added:
            undone.append(f"{path}: registered diffusers hooks {added}")
        if [name for name in registry._hook_order] != list(before.registry_order or ()):
            stuck.append(f"{path}: removed diffusers hooks {sorted(kept - set(registry._hook_order))}")
    elif before.registry is not None:
        module.__dict__["_diffusers_hook"] = before.registry
        stuck.append(f"{path}: deleted its diffusers hook registry (put back; its hooks may be broken)")


@contextlib.contextmanager
def encode_guard(pipe: Any, *, plugin: str, distribution: str | None) -> Iterator[None]:
    """Run a plugin's encode; afterwards undo what it changed on ``pipe`` and refuse it if anything was.

    Raises :class:`PluginError` listing the changes (chained to the plugin's own exception, if it
    raised one too). A ``KeyboardInterrupt`` inside the encode still propagates as itself, after the undo.
    """
    before = Fingerprint.take(pipe)
    try:
        yield
    except Exception as exc:
        _check(before, plugin, distribution, cause=exc)
        raise
    except BaseException:
        before.restore()
        raise
    _check(before, plugin, distribution)


def _check(
    before: Fingerprint, plugin: str, distribution: str | None, cause: Exception | None = None
) -> None:
    undone, stuck = before.restore()
    if undone or stuck:
        error = PluginError(_message(undone, stuck), plugin=plugin, distribution=distribution)
        error.changes = undone + stuck
        raise error from cause


def _grouped(items: list[str], limit: int = 6) -> str:
    """``path: what`` items with one ``what`` shown once: "transformer and 107 more: set training=True"."""
    groups: dict[str, list[str]] = {}
    for item in items:
        path, _, what = item.rpartition(": ")
        groups.setdefault(what, []).append(path)
    shown = [
        f"{paths[0]}{f' and {len(paths) - 1} more' if len(paths) > 1 else ''}: {what}" if paths[0] else what
        for what, paths in groups.items()
    ]
    more = f"; and {len(shown) - limit} more" if len(shown) > limit else ""
    return "; ".join(shown[:limit]) + more


def _message(undone: list[str], stuck: list[str]) -> str:
    parts = ["encode changed the pipeline, which a template may only read; the encode is refused"]
    if undone:
        parts.append(f"undone: {_grouped(undone)}")
    if stuck:  # each named: these are what the user must reload
        listed = "; ".join(stuck[:8]) + (f"; and {len(stuck) - 8} more" if len(stuck) > 8 else "")
        parts.append(
            f"NOT undone (no copy of tensor memory is kept): {listed}; reload the pipeline's weights"
        )
    return ". ".join(parts)
