"""Template models loaded on first use, kept in an LRU bounded by parameter bytes.

A template calls, from its ``encode``::

    from diffusion_templates import models

    model = models.load(BrightnessModel, folder, device=context.device, dtype=context.dtype)

The first call loads the weights (``cls.from_pretrained``: safetensors and JSON only, see
``TemplateModel.from_pretrained``; for any other class ``use_safetensors=True`` is passed and a
folder of pickle weights is refused unless ``allow_pickle=True``, see ``pickle_guard``); later
calls return the same module at once. Models stay
loaded until the loader's byte budget needs room, least recently used first, so registering many
templates costs nothing until they are used and switching between used ones reloads nothing (the
reference implementation's ``lazy_loading`` reloads code and weights at every switch).

With ``offload=True`` only the model asked for last sits on its device: the others wait on the
CPU (``offload_device``) and move back to the requested device on their next ``load``. Use
:meth:`TemplateModelLoader.use` to send a model back to the CPU as soon as a block ends, or
:meth:`TemplateModelLoader.offload_all` after a pipeline call.

A template must not keep its own reference to a model between calls (call ``load`` each time: it
is a dictionary lookup), or evicting it frees nothing.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: Default budget of the process-wide loader: 8 GiB of parameters and buffers.
DEFAULT_MAX_BYTES = 8 * 2**30


def module_nbytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each storage once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        seen[key] = max(seen.get(key, 0), storage.nbytes())
    return sum(seen.values())


def _device_of(module: torch.nn.Module) -> torch.device | None:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


def _same_device(a: torch.device | None, b: torch.device) -> bool:
    if a is None:
        return True
    if a.type != b.type:
        return False
    return b.index is None or a.index is None or a.index == b.index


@dataclass
class LoaderStats:
    loads: int = 0
    """Weights read (first use, or again after an eviction)."""
    hits: int = 0
    evictions: int = 0
    offloads: int = 0
    """Moves to the offload device."""
    onloads: int = 0
    """Moves back to the device asked for."""


@dataclass
class _Entry:
    model: torch.nn.Module
    nbytes: int


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False


class TemplateModelLoader:
    """Loads Template models on first use and keeps them in an LRU bounded by ``max_bytes``.

    ``max_bytes``: budget for all kept models (parameters and buffers, wherever they sit);
    ``None`` is unbounded. The model just asked for is always kept, even when it alone is over
    budget. ``offload``: keep only the model asked for last on its device, the others on
    ``offload_device``.
    """

    def __init__(
        self,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        *,
        offload: bool = False,
        offload_device: str | torch.device = "cpu",
    ):
        self.max_bytes = max_bytes
        self.offload = offload
        self.offload_device = torch.device(offload_device)
        self.stats = LoaderStats()
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.RLock()
        self._flights: dict[tuple, _Flight] = {}

    def __repr__(self) -> str:
        budget = "unbounded" if self.max_bytes is None else f"{self.max_bytes / 2**20:.0f} MiB"
        return (
            f"TemplateModelLoader({len(self)} models, {self.nbytes / 2**20:.1f} MiB of {budget}, "
            f"offload={self.offload})"
        )

    @staticmethod
    def key(cls: type, folder: str | os.PathLike, dtype: torch.dtype | None, kwargs: dict[str, Any]) -> tuple:
        path = os.fspath(folder)
        if Path(path).exists():
            path = str(Path(path).resolve())
        return (
            f"{cls.__module__}.{cls.__qualname__}",
            path,
            str(dtype),
            tuple(sorted((k, repr(v)) for k, v in kwargs.items())),
        )

    # -- use -------------------------------------------------------------------------------------------
    def load(
        self,
        cls: type,
        folder: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        loader: Callable[..., torch.nn.Module] | None = None,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> torch.nn.Module:
        """The model of class ``cls`` with the weights in ``folder`` (a folder or hub id), in eval mode,
        on ``device`` (default: where it was loaded, the CPU), in ``dtype`` (default: as saved).

        ``kwargs`` go to ``cls.from_pretrained`` (with ``torch_dtype=dtype`` and ``use_safetensors=True``);
        ``loader(folder, **kwargs)`` replaces it. A local folder whose weights are pickles only is refused
        (:class:`~diffusion_templates.pickle_guard.PickleWeightsError`) unless ``allow_pickle``, with a
        custom ``loader`` too. A model loaded with ``allow_pickle`` is kept under its own key: a later
        call without it is refused as usual rather than served the unpickled model.
        """
        key = self.key(cls, folder, dtype, {**kwargs, "allow_pickle": True} if allow_pickle else kwargs)
        target = torch.device(device) if device is not None else None
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self.stats.hits += 1
                    return self._place(key, entry.model, target)
                flight = self._flights.get(key)
                owner = flight is None
                if owner:
                    flight = self._flights[key] = _Flight()
            if not owner:
                flight.done.wait()
                continue  # loaded (a hit next time round) or failed (load ourselves, raise our own error)
            try:
                model = self._read(cls, folder, dtype, loader, kwargs, allow_pickle)
                if target is not None:
                    model.to(target)
                with self._lock:
                    self.stats.loads += 1
                    self._entries[key] = _Entry(model, module_nbytes(model))
                    self._evict(keep=key)
                    placed = self._place(key, model, target)
                flight.ok = True
                return placed
            finally:
                with self._lock:
                    self._flights.pop(key, None)
                flight.done.set()

    @contextlib.contextmanager
    def use(self, cls: type, folder: str | os.PathLike, **kwargs: Any) -> Iterator[torch.nn.Module]:
        """``load`` for the block; with ``offload=True`` the model goes back to the CPU after it."""
        model = self.load(cls, folder, **kwargs)
        try:
            yield model
        finally:
            if self.offload:
                with self._lock:
                    self._move(model, self.offload_device)

    def offload_all(self) -> None:
        """Move every kept model to ``offload_device`` (e.g. after a pipeline call)."""
        with self._lock:
            for entry in self._entries.values():
                self._move(entry.model, self.offload_device)

    def evict(self, cls: type | None = None, folder: str | os.PathLike | None = None) -> int:
        """Forget the models of ``cls`` (and ``folder``), or all; returns how many were dropped."""
        with self._lock:
            name = None if cls is None else f"{cls.__module__}.{cls.__qualname__}"
            path = None if folder is None else self.key(cls or object, folder, None, {})[1]
            drop = [k for k in self._entries if (name in (None, k[0])) and (path in (None, k[1]))]
            for k in drop:
                del self._entries[k]
            return len(drop)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.stats = LoaderStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def models(self) -> list[torch.nn.Module]:
        """Kept models, least recently used first."""
        with self._lock:
            return [e.model for e in self._entries.values()]

    # -- internals -------------------------------------------------------------------------------------
    @staticmethod
    def _read(cls, folder, dtype, loader, kwargs, allow_pickle: bool) -> torch.nn.Module:
        from .pickle_guard import from_pretrained, refuse_pickle

        if dtype is not None:
            kwargs = {**kwargs, "torch_dtype": dtype}
        if loader is not None:  # the caller's function: its keywords are its own; the folder check is ours
            if not allow_pickle:
                refuse_pickle(folder)
            model = loader(folder, **kwargs)
        else:  # diffusers casts (and keeps fp32 modules)
            model = from_pretrained(cls.from_pretrained, folder, allow_pickle=allow_pickle, **kwargs)
        return model.eval().requires_grad_(False)

    def _move(self, model: torch.nn.Module, device: torch.device) -> None:
        if not _same_device(_device_of(model), device):
            model.to(device)
            if device == self.offload_device:
                self.stats.offloads += 1
            else:
                self.stats.onloads += 1

    def _place(self, key: tuple, model: torch.nn.Module, target: torch.device | None) -> torch.nn.Module:
        if self.offload:
            for other, entry in self._entries.items():
                if other != key:
                    self._move(entry.model, self.offload_device)
        if target is not None:
            self._move(model, target)
        return model

    def _evict(self, keep: tuple) -> None:
        if self.max_bytes is None:
            return
        total = sum(e.nbytes for e in self._entries.values())
        for key in list(self._entries):
            if total <= self.max_bytes:
                break
            if key == keep:
                continue
            total -= self._entries.pop(key).nbytes
            self.stats.evictions += 1


# ------------------------------------------------------------------------------ process-wide loader
_default: TemplateModelLoader | None = None
_default_lock = threading.Lock()


def default_loader() -> TemplateModelLoader:
    """The process-wide loader that :func:`load` uses."""
    global _default
    with _default_lock:
        if _default is None:
            _default = TemplateModelLoader()
        return _default


def configure(
    max_bytes: int | None = DEFAULT_MAX_BYTES, *, offload: bool = False, offload_device: str = "cpu"
) -> TemplateModelLoader:
    """Replace the process-wide loader (its models are dropped) with one of these settings."""
    global _default
    with _default_lock:
        _default = TemplateModelLoader(max_bytes, offload=offload, offload_device=offload_device)
        return _default


def load(
    cls: type,
    folder: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    **kwargs: Any,
) -> torch.nn.Module:
    """``default_loader().load(...)``: see :meth:`TemplateModelLoader.load`."""
    return default_loader().load(cls, folder, device=device, dtype=dtype, allow_pickle=allow_pickle, **kwargs)
