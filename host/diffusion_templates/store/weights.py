"""The weights part of a store key: a content digest of the pipeline components a template reads.

Two pipelines with the same config and different weights (a base model and its fine-tune) must
never share an entry, and neither may one pipeline before and after its weights were edited. So a
key holds a SHA-256 of every parameter and persistent buffer (name, dtype, shape and bytes) of each
``nn.Module`` component the template reads; other components count by class and content: a config
(schedulers), a vocabulary (tokenizers).

Which components: the template plugin's ``reads`` (``Template.reads``), a tuple of pipeline
component names (``"denoiser"`` names the adapter's denoiser, whatever the pipeline calls it);
``None``, the default, means all of them, ``()`` none (a template whose caches follow from its
inputs alone: the key still has the backbone's config and dtype).

Hashing a model's bytes costs about a second per GB on a CPU core, so each module's digest is kept
with, per tensor, its ``id``, ``data_ptr`` and ``_version`` (torch's in-place modification counter):
a later call re-reads those (a few hundred nanoseconds per tensor) and hashes again only the tensors
that changed. ``_version`` moves on every in-place operation on the tensor (``copy_``, ``add_``,
``load_state_dict``, an optimizer step), ``data_ptr`` when ``.data`` is reassigned or the module moves
device or dtype; replaced parameters and new submodules are seen through torch's global
module/parameter/buffer registration hooks (installed once, process-wide, on first use: they only
log which module changed) and a look-up of every tensor in its module's dict.
What torch does not count is invisible: an edit *through* ``param.data`` (``p.data.add_(...)``, as
PEFT's ``merge``/diffusers' ``fuse_lora`` do) changes neither. After such an edit call
:func:`forget_weight_digests`. Parameters on the ``meta`` device (sequential offloading) cannot be
hashed: such calls are not cached.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import operator
import os
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from .keys import Uncacheable, _dumps, config_digest

#: Hash in worker threads (hashlib releases the GIL) when a module's new bytes exceed this.
_PARALLEL_BYTES = 64 * 2**20
_version = operator.attrgetter("_version")
_data_ptr = torch.Tensor.data_ptr
_getitem = dict.__getitem__

# torch calls these on every ``module.x = Parameter/Module/Buffer`` and ``register_*``. Each call
# logs the id of the module whose structure changed; a memo is rebuilt only when a module it walked
# is in the log since the memo was made (building unrelated modules elsewhere costs nothing).
_events: list[int] = []
_events_base = [0]  # the generation of _events[0]
_EVENTS_KEPT = 65536
_hooks_lock = threading.Lock()
_hooks_installed = False


def _bump(module: Any, *_: Any) -> None:
    _events.append(id(module))
    if len(_events) > _EVENTS_KEPT:
        with _hooks_lock:
            drop = len(_events) // 2
            del _events[:drop]
            _events_base[0] += drop


def _generation() -> int:
    with _hooks_lock:
        return _events_base[0] + len(_events)


def _changed_since(generation: int, now: int) -> list[int] | None:
    """Ids of the modules whose structure changed between two generations (``None``: forgotten)."""
    with _hooks_lock:
        base = _events_base[0]
        return None if generation < base else _events[generation - base : now - base]


def _install_hooks() -> None:
    global _hooks_installed
    with _hooks_lock:
        if not _hooks_installed:
            from torch.nn.modules import module as torch_module

            torch_module.register_module_module_registration_hook(_bump)
            torch_module.register_module_parameter_registration_hook(_bump)
            torch_module.register_module_buffer_registration_hook(_bump)
            _hooks_installed = True


def _tensor_digest(tensor: torch.Tensor) -> str:
    t = tensor.detach()
    if t.device.type == "meta":
        raise Uncacheable("a parameter on the meta device (offloaded) cannot be hashed by content")
    if t.layout != torch.strided or t.is_quantized:
        raise Uncacheable(f"cannot hash a {t.layout} / quantized parameter by content")
    try:
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous().reshape(-1)
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        data = memoryview(t.view(torch.uint8).numpy())
    except (RuntimeError, TypeError) as exc:  # a tensor subclass or dtype numpy cannot view
        raise Uncacheable(f"cannot hash a {t.dtype} parameter by content ({exc})") from None
    return hashlib.sha256(data).hexdigest()


class _ModuleWeights:
    """One module's tensors (as dict + name, so replacements are seen) and what was hashed."""

    __slots__ = (
        "generation",
        "module_ids",
        "dicts",
        "names",
        "refs",
        "ids",
        "versions",
        "ptrs",
        "records",
        "digest",
    )

    def __init__(
        self, generation: int, module_ids: set[int], dicts: list[dict], names: list[str], records: list[tuple]
    ) -> None:
        self.generation = generation
        self.module_ids = module_ids
        self.dicts = dicts
        self.names = names
        tensors = list(map(_getitem, dicts, names))
        self.refs = list(map(weakref.ref, tensors))  # so a digest is reused only for the same object
        self.ids = list(map(id, tensors))
        self.versions = list(map(_version, tensors))
        self.ptrs = list(map(_data_ptr, tensors))
        self.records = records  # (qualified name, dtype, shape, stride, sha256) per tensor
        text = "\n".join(f"{r[0]}|{r[1]}|{list(r[2])}|{r[4]}" for r in sorted(records))
        self.digest = hashlib.sha256(text.encode()).hexdigest()

    def unchanged(self, generation: int) -> bool:
        if generation != self.generation:
            changed = _changed_since(self.generation, generation)
            if changed is None or not self.module_ids.isdisjoint(changed):
                return False
            self.generation = generation  # only modules outside this one changed
        try:
            tensors = list(map(_getitem, self.dicts, self.names))
        except KeyError:  # a parameter deleted from its module
            return False
        return (
            list(map(id, tensors)) == self.ids
            and list(map(_version, tensors)) == self.versions
            and list(map(_data_ptr, tensors)) == self.ptrs
        )


_modules: weakref.WeakKeyDictionary[torch.nn.Module, _ModuleWeights] = weakref.WeakKeyDictionary()
_modules_lock = threading.Lock()


def module_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and persistent buffer of ``module`` (names, dtypes, shapes and
    bytes), from memory while no tensor changed (see the module docstring). Raises :class:`Uncacheable`
    for tensors on the meta device."""
    _install_hooks()
    memo = _modules.get(module)
    generation = _generation()
    if memo is not None and memo.unchanged(generation):
        return memo.digest
    with _modules_lock:
        memo = _rebuild(module, _modules.get(module), generation)
        _modules[module] = memo
    return memo.digest


def _rebuild(module: torch.nn.Module, old: _ModuleWeights | None, generation: int) -> _ModuleWeights:
    """Walk ``module`` again; hash only tensors whose (name, id, data_ptr, version, dtype, shape,
    stride) is not in ``old``."""
    known: dict[tuple, tuple[weakref.ref, str]] = {}
    if old is not None:
        for (qualified, dtype, shape, stride, digest), ref, i, v, p in zip(
            old.records, old.refs, old.ids, old.versions, old.ptrs, strict=True
        ):
            known[(qualified, i, v, p, dtype, shape, stride)] = (ref, digest)
    dicts: list[dict] = []
    names: list[str] = []
    todo: list[tuple[int, tuple, torch.Tensor]] = []
    records: list[Any] = []
    module_ids = set()
    for prefix, sub in module.named_modules():
        module_ids.add(id(sub))
        skip = sub._non_persistent_buffers_set
        for kind in (sub._parameters, sub._buffers):
            for name, tensor in kind.items():
                if tensor is None or (kind is sub._buffers and name in skip):
                    continue
                qualified = f"{prefix}.{name}" if prefix else name
                dicts.append(kind)
                names.append(name)
                try:
                    dtype, shape, stride = str(tensor.dtype), tuple(tensor.shape), tuple(tensor.stride())
                    key = (qualified, id(tensor), tensor._version, tensor.data_ptr(), dtype, shape, stride)
                except (RuntimeError, TypeError) as exc:  # sparse or otherwise without strided storage
                    raise Uncacheable(f"cannot hash parameter {qualified!r} by content ({exc})") from None
                held = known.get(key)
                digest = held[1] if held is not None and held[0]() is tensor else None
                if digest is None:
                    todo.append((len(records), (qualified, dtype, shape, stride), tensor))
                records.append((qualified, dtype, shape, stride, digest))
    new_bytes = sum(t.numel() * t.element_size() for _, _, t in todo)
    if new_bytes > _PARALLEL_BYTES and len(todo) > 1:
        workers = min(8, os.cpu_count() or 1, len(todo))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            digests = list(pool.map(_tensor_digest, (t for _, _, t in todo)))
    else:
        digests = [_tensor_digest(t) for _, _, t in todo]
    for (index, head, _), digest in zip(todo, digests, strict=True):
        records[index] = (*head, digest)
    return _ModuleWeights(generation, module_ids, dicts, names, records)


def forget_weight_digests() -> None:
    """Hash every module's weights again at its next use: for edits torch does not count (through
    ``param.data``, or straight into a module's ``_parameters`` dict)."""
    with _modules_lock:
        _modules.clear()


# ------------------------------------------------------------------------------------- components
#: component -> (marker, kind, identity) of components that are not modules
_others: weakref.WeakKeyDictionary[Any, tuple[Any, str, str]] = weakref.WeakKeyDictionary()
#: pipeline -> (config object, component names)
_names: weakref.WeakKeyDictionary[Any, tuple[Any, tuple[str, ...]]] = weakref.WeakKeyDictionary()


def _class_name(value: Any) -> str:
    klass = type(value)
    return f"{klass.__module__}.{klass.__qualname__}"


def component_identity(component: Any) -> str:
    """What one pipeline component contributes to a key: weights by content for modules, the config
    for config objects (schedulers), the vocabulary for tokenizers, the class for anything else."""
    if component is None:
        return "none"
    if isinstance(component, torch.nn.Module):
        return f"module:{_class_name(component)}:{module_digest(component)}"
    try:
        held = _others.get(component)
    except TypeError:  # not weakly referenceable or not hashable: worked out every time
        held = None
    if held is not None:
        current = _marker(component, held[1])
        if current is held[0] or (held[1] != "config" and current == held[0]):
            return held[2]
    kind, marker, identity = _identify(component)
    with contextlib.suppress(TypeError):
        _others[component] = (marker, kind, identity)
    return identity


def _marker(component: Any, kind: str) -> Any:
    """What, when unchanged, means a component's identity is unchanged (see :func:`_identify`)."""
    if kind == "config":
        return component.config
    if kind == "vocab":
        return (len(component), component.model_max_length)
    return None


def _identify(component: Any) -> tuple[str, Any, str]:
    name = _class_name(component)
    config = getattr(component, "config", None)
    if isinstance(config, Mapping):  # diffusers replaces the frozen config object when it changes
        return "config", config, f"config:{name}:{config_digest(config)}"
    if callable(getattr(component, "get_vocab", None)) and hasattr(component, "model_max_length"):
        # A tokenizer: its vocabulary can grow (add_tokens), so its length is part of the check.
        marker = (len(component), component.model_max_length)
        return "vocab", marker, f"vocab:{name}:{_vocab_digest(component)}"
    return "object", None, f"object:{name}"


def _vocab_digest(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None and hasattr(backend, "to_str") else ""
    items = sorted((str(k), int(v)) for k, v in tokenizer.get_vocab().items())
    extra = {"max_length": tokenizer.model_max_length, "backend": text, "vocab": items}
    return hashlib.sha256(_dumps(extra).encode()).hexdigest()


def template_reads(plugin: Any, template: str) -> tuple[str, ...] | None:
    """The plugin's ``reads`` (see :attr:`diffusion_templates.Template.reads`), checked: ``None`` for
    all components, else a sorted tuple of component names."""
    reads = getattr(plugin, "reads", None)  # optional for plugins that do not subclass Template
    if reads is None:
        return None
    if isinstance(reads, str) or not isinstance(reads, (tuple, list, frozenset, set)):
        raise TypeError(
            f"template {template!r}: reads must be a tuple of component names or None, got {reads!r}"
        )
    if not all(isinstance(name, str) for name in reads):
        raise TypeError(f"template {template!r}: reads must hold component names (strings), got {reads!r}")
    return tuple(sorted(set(reads)))


def component_names(pipe: Any) -> tuple[str, ...]:
    """The pipeline's component names (diffusers' ``pipe.components``), remembered per config object
    (``register_modules`` replaces it when components change)."""
    config = getattr(pipe, "config", None)
    if not isinstance(config, Mapping):
        return ()
    return tuple(sorted(_memo_names(pipe, config)))


def _memo_names(pipe: Any, config: Mapping) -> tuple[str, ...]:
    def compute() -> tuple[str, ...]:
        try:
            components = pipe.components
        except Exception:  # not a DiffusionPipeline, or one whose config and signature disagree
            components = None
        if isinstance(components, Mapping):
            return tuple(str(k) for k in components)
        return tuple(str(k) for k in config if not str(k).startswith("_"))

    try:
        held = _names.get(pipe)
    except TypeError:
        return compute()
    if held is not None and held[0] is config:
        return held[1]
    names = compute()
    _names[pipe] = (config, names)
    return names


def pipeline_weights(pipe: Any, denoiser: torch.nn.Module, reads: tuple[str, ...] | None) -> str:
    """The weights part of a key: SHA-256 of ``name=identity`` for each component read (``reads``
    ``None``: every component of ``pipe``; the adapter's ``denoiser`` counts as ``"denoiser"`` when the
    pipeline has no components to list). ``""`` when the template reads nothing."""
    if reads is None:
        names = component_names(pipe) or ("denoiser",)
    else:
        names = reads
    if not names:
        return ""
    parts = []
    for name in names:
        component = denoiser if name == "denoiser" else getattr(pipe, name, None)
        parts.append(f"{name}={component_identity(component)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
