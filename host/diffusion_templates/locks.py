"""Locks that serialise the calls sharing a stateful pipeline component.

A call changes more than the denoiser: injections hook into the denoiser's modules, the scheduler
keeps its step index and timesteps, a fast tokenizer its padding and truncation settings, and a VAE
may keep per-call caches (Qwen-Image's) that the latent carriers and the decode both use. Two
pipelines made with ``from_pipe`` share any of these, so the lock belongs to each component, not
to a pipeline: a call holds the lock of every stateful component of its pipeline
(:func:`stateful_components`). Pipelines sharing nothing stateful run in parallel.

Deadlock freedom: each component's lock gets a sequence number when it is created, and a call
acquires its locks in increasing sequence order, so all threads take any two locks in the same
order. Locks are re-entrant (a template's ``encode`` may run the pipeline again on this thread). The
one way around the order is a call made from inside another call on a pipeline with components the
outer call does not hold (a template running some *other* pipeline): it takes those locks while
holding the outer ones, so two threads doing that crosswise could wait on each other.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch

#: id(component) -> (its lock, the lock's place in the global acquisition order).
_locks: dict[int, tuple[threading.RLock, int]] = {}
_guard = threading.Lock()
_sequence = itertools.count()
_immortal: list[Any] = []  # components that cannot be weakly referenced: their lock never goes away


def _forget(key: int) -> None:
    # Runs when the component is garbage collected, before its id can be reused; dict.pop is atomic,
    # and taking ``_guard`` here could deadlock (the collection may run inside ``component_lock``).
    _locks.pop(key, None)


def _entry(component: Any) -> tuple[threading.RLock, int]:
    key = id(component)
    with _guard:
        entry = _locks.get(key)
        if entry is None:
            entry = _locks[key] = (threading.RLock(), next(_sequence))
            try:
                weakref.finalize(component, _forget, key)
            except TypeError:
                _immortal.append(component)
        return entry


def component_lock(component: Any) -> threading.RLock:
    """The one re-entrant lock of ``component`` (the same object for every pipeline sharing it)."""
    return _entry(component)[0]


def pipeline_components(pipe: Any) -> dict[str, Any]:
    """A diffusers pipeline's component objects by name, without ``pipe.components``' signature walk.

    The pipeline's config lists each component as a ``(library, class)`` pair and each setting
    (``is_distilled``, ...) as a plain value; only the former are read (reading a setting through
    the pipeline's attribute is deprecated). Missing (``None``) components are left out.
    """
    found = {}
    for name, value in (getattr(pipe, "config", None) or {}).items():
        if not name.startswith("_") and isinstance(value, (tuple, list)) and len(value) == 2:
            component = pipe.__dict__.get(name)
            if component is not None:
                found[name] = component
    return found


def stateful_components(pipe: Any, denoiser: torch.nn.Module) -> list[Any]:
    """What a call through ``pipe`` keeps state in: the denoiser, the VAE, and every component that
    is not a module (scheduler, tokenizers, processors, feature extractors).

    Text and image encoders are left out: a forward pass of them keeps no state, and leaving them
    out lets pipelines that share only their text encoders run in parallel.
    """
    found: dict[int, Any] = {id(denoiser): denoiser}
    for name, component in pipeline_components(pipe).items():
        if not isinstance(component, torch.nn.Module) or name == "vae":
            found.setdefault(id(component), component)
    return list(found.values())


@contextlib.contextmanager
def holding(components: list[Any]) -> Iterator[None]:
    """Hold the locks of ``components``, taken in the global order (see the module doc)."""
    entries = sorted({id(c): _entry(c) for c in components}.values(), key=lambda entry: entry[1])
    taken: list[threading.RLock] = []
    try:
        for lock, _ in entries:
            lock.acquire()
            taken.append(lock)
        yield
    finally:
        for lock in reversed(taken):
            lock.release()


def pipeline_lock(pipe: Any, denoiser: torch.nn.Module) -> contextlib.AbstractContextManager[None]:
    """Hold the lock of every stateful component of ``pipe`` (:func:`stateful_components`)."""
    return holding(stateful_components(pipe, denoiser))
