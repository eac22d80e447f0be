"""Extra keys/values at one attention module's attention call, and reading that call's own K/V.

Design: an *attention point* per attention module. While a call needs it, the module's processor is
replaced by a wrapper that runs the original processor's own ``__call__`` code (a function rebuilt
from the same code object, defaults and closure) over a globals dict of its own, in which the
attention function that code calls is an injecting one:

* ``dispatch``: FLUX.1, FLUX.2 and Qwen-Image processors call ``dispatch_attention_fn`` with RoPE'd
  (B, L, heads, head_dim) tensors and ``backend=self._attention_backend``. One rebuilt code per
  processor class; the wrapper's ``_attention_backend`` is a :class:`_PointBackend` carrying the
  point, the processor's own backend and the module's live ``dispatch_attention_fn``, which the
  injecting function calls (so a backend another library wrapped in ``_AttentionBackendRegistry`` is
  still the one used). Sharing the code keeps a regionally compiled block one graph for all blocks.
* ``sdpa``: SD3's and the UNet's processors (``attention_processor.py``) call
  ``F.scaled_dot_product_attention(query, key, value, ...)`` on (B, heads, L, head_dim) tensors, with
  nothing that could carry the point: one rebuilt code per point, whose ``F`` is a namespace holding
  the live ``F``'s attributes, ``scaled_dot_product_attention`` being the point's, which calls the
  live ``F``'s (a proxy another library installed on ``attention_processor.F`` keeps being used).

Why this design: the output is bit-identical to diffusers' processor (the same code runs), nothing
process-wide is replaced (no registry entry, no module attribute of diffusers or torch), the
wrapper's class subclasses the original's so ``self._attention_backend`` and ``isinstance`` checks
see the original, and ``inspect.signature(wrapper.__call__)`` equals the original's (diffusers'
attention modules filter keyword arguments by it; a ``**kwargs`` wrapper would silently lose some).
A processor the host cannot see through (anything not in :data:`PROCESSORS`: a custom class calling
torch's SDPA itself, ``AttnProcessor``, IP-adapter processors) is refused by :func:`check_layer`
before any denoising. Points, their wrapper classes and namespaces are made once per module and
reused (refreshed in place at each install), so ``torch.compile`` sees the same objects call after
call and does not recompile for a new template of the same K/V length; the ContextVar read that
keeps a call's K/V away from other threads is skipped while dynamo traces (it cannot trace it), where
the denoiser lock serialises templated calls.

What reaches the attention call is attached to the point by injections: :class:`KVEntry` (extra K/V
for the rows of one CFG branch, from ``call.layout``) and recorders (``reference.py`` reads each
call's own K/V, (B, L, heads, head_dim) after RoPE, before extra K/V are appended). The processor is
put back, the very same object, when the last attachment leaves.
"""

from __future__ import annotations

import threading
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from .errors import UnsupportedError

Kind = Literal["dispatch", "sdpa"]


def _known_processors() -> dict[type, Kind]:
    from diffusers.models import attention_processor as ap
    from diffusers.models.transformers import transformer_flux, transformer_flux2, transformer_qwenimage

    return {
        transformer_flux2.Flux2AttnProcessor: "dispatch",
        transformer_flux2.Flux2ParallelSelfAttnProcessor: "dispatch",
        transformer_flux.FluxAttnProcessor: "dispatch",
        transformer_qwenimage.QwenDoubleStreamAttnProcessor2_0: "dispatch",
        ap.JointAttnProcessor2_0: "sdpa",
        ap.AttnProcessor2_0: "sdpa",
    }


#: Processor classes (exact types) whose attention call the host reaches, and through which function.
PROCESSORS: dict[type, Kind] = _known_processors()


class Owner(Protocol):
    """Who attached something to a point: ``active`` is True in the code of that call only."""

    @property
    def active(self) -> bool: ...


class _Layout(Protocol):
    def rows_of(self, branch: str) -> slice | None: ...

    @property
    def whole(self) -> str | None: ...


@dataclass(frozen=True, eq=False)
class KVEntry:
    """Extra (key, value), each (B or 1, L, heads, head_dim), for the rows of ``branch``.

    ``call`` is the ``CallState`` of the call that attached it: its ``layout`` says which rows of the
    running denoiser call belong to ``branch`` (the entry is skipped when it has none).
    """

    key: torch.Tensor
    value: torch.Tensor
    branch: str
    call: Any


def processor_of(module: torch.nn.Module) -> Any:
    """The processor object an attention module calls (the original one while a point is installed)."""
    processor = module.__dict__.get("processor")
    if getattr(type(processor), "_dt_point_wrapper", False):
        return processor._dt_original
    return processor


def check_layer(name: str, module: torch.nn.Module, *, what: str) -> None:
    """Raise unless the host can reach ``module``'s attention call (``what`` names who asks)."""
    processor = processor_of(module)
    if type(processor) not in PROCESSORS:
        known = ", ".join(sorted(cls.__name__ for cls in PROCESSORS))
        raise UnsupportedError(
            f"{what}: attention layer {name!r} uses processor {type(processor).__name__}, whose attention "
            f"call the host cannot reach, so extra K/V would be silently ignored; supported processors: "
            f"{known} (set one with set_attn_processor, or leave this layer out)"
        )


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


class _Functional:
    """``F`` as the point's processor code sees it: the live ``F``'s attributes, SDPA the point's."""


_MISSING = object()


@dataclass(frozen=True, eq=False)
class _PointBackend:
    """What a dispatch processor's wrapper passes as ``backend``: the processor's own backend, the
    point to inject through and the live ``dispatch_attention_fn`` to call."""

    point: AttentionPoint
    backend: Any
    inner: Callable[..., Any]


def _dispatch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
    """``dispatch_attention_fn`` in the globals of every rebuilt dispatch processor's code."""
    via: _PointBackend = kwargs.pop("backend")
    return via.point._attend(via.inner, query, key, value, args, {**kwargs, "backend": via.backend}, 1)


class _Rebuilt:
    """A processor class's ``__call__`` rebuilt over a globals dict of its own, and the wrapper class
    (a subclass of the processor's, so class attributes and ``isinstance`` see the original)."""

    def __init__(self, cls: type) -> None:
        call = cls.__call__
        self.globals: dict[str, Any] = {}
        rebuilt = types.FunctionType(
            call.__code__, self.globals, call.__name__, call.__defaults__, call.__closure__
        )
        rebuilt.__kwdefaults__ = call.__kwdefaults__
        rebuilt.__qualname__ = call.__qualname__
        rebuilt.__annotations__ = dict(call.__annotations__)
        namespace = {"__call__": rebuilt, "_dt_point_wrapper": True, "__module__": cls.__module__}
        self.wrapper_class = type(cls.__name__, (cls,), namespace)
        self.live = call.__globals__
        # No ``__name__``: dynamo would read a globals dict with one as that module's own globals.
        self.names = _code_names(call.__code__) | {"__builtins__"}

    def refresh(self, replace: dict[str, Any]) -> None:
        """Make the globals equal the module's live ones for the names the code reads, ``replace``
        overriding; entries are written only when they changed (the dict stays the same object)."""
        for name in self.names:
            value = replace.get(name, self.live.get(name, _MISSING))
            if value is _MISSING:
                self.globals.pop(name, None)
            elif self.globals.get(name, _MISSING) is not value:
                self.globals[name] = value


#: Dispatch processors share one rebuilt code per class (the point travels in ``backend``), so a
#: regionally compiled block (``compile_repeated_blocks``) is one graph for all its instances.
_shared: dict[type, _Rebuilt] = {}


class AttentionPoint:
    """The attention call of one attention module, reachable while something is attached."""

    def __init__(self, module: torch.nn.Module, name: str):
        self.name = name
        self._module = weakref.ref(module)
        self.entries: tuple[KVEntry, ...] = ()
        self.recorders: tuple[tuple[Callable[[torch.Tensor, torch.Tensor], None], Owner], ...] = ()
        self._users = 0
        self._original: Any = None
        self._wrapper: Any = None
        self._own: _Rebuilt | None = None  # SDPA processors: F has no argument to carry the point
        self._functional = _Functional()
        # Bound once: the same object in the point's namespace at every install (torch.compile guards).
        self._sdpa_fn = self.sdpa
        self._inner: Callable[..., Any] | None = None

    # -- install / remove ------------------------------------------------------------------------
    def _install(self) -> None:
        module = self._module()
        original = module.__dict__.get("processor")
        check_layer(self.name, module, what="attention point")
        cls = type(original)
        state = dict(original.__dict__)
        state["_dt_original"] = original
        if PROCESSORS[cls] == "dispatch":
            with _lock:
                rebuilt = _shared.get(cls)
                if rebuilt is None:
                    rebuilt = _shared[cls] = _Rebuilt(cls)
                rebuilt.refresh({"dispatch_attention_fn": _dispatch})
            previous = self._wrapper.__dict__.get("_attention_backend") if self._wrapper is not None else None
            via = _PointBackend(self, original._attention_backend, rebuilt.live["dispatch_attention_fn"])
            if previous is not None and previous.backend is via.backend and previous.inner is via.inner:
                via = previous  # the same object as last time: no new guard for torch.compile
            state["_attention_backend"] = via
        else:
            if self._own is None or not issubclass(self._own.wrapper_class, cls):
                self._own = _Rebuilt(cls)
            rebuilt = self._own
            live_f = rebuilt.live["F"]
            self._inner = live_f.scaled_dot_product_attention
            self._refresh_functional(rebuilt.names, live_f)
            rebuilt.refresh({"F": self._functional})
        if self._wrapper is None or type(self._wrapper) is not rebuilt.wrapper_class:
            self._wrapper = object.__new__(rebuilt.wrapper_class)
        wrapper = self._wrapper
        if wrapper.__dict__ != state:
            wrapper.__dict__.clear()
            wrapper.__dict__.update(state)
        self._original = original
        module.processor = wrapper

    def _refresh_functional(self, names: set[str], live_f: Any) -> None:
        space = self._functional.__dict__
        for name in names:
            value = (
                self._sdpa_fn if name == "scaled_dot_product_attention" else getattr(live_f, name, _MISSING)
            )
            if value is _MISSING:
                space.pop(name, None)
            elif space.get(name, _MISSING) is not value:
                space[name] = value

    def _uninstall(self) -> None:
        module = self._module()
        if module is not None and module.__dict__.get("processor") is self._wrapper:
            module.processor = self._original
        # ``_inner`` stays: a bare call in another thread may still be inside the wrapper it read.

    # -- attachments -----------------------------------------------------------------------------
    def _acquire(self) -> None:
        if self._users == 0:
            self._install()  # raises before changing the module when the processor is unknown
        self._users += 1

    def _release(self) -> None:
        self._users -= 1
        if self._users == 0:
            self._uninstall()

    def attach(self, entry: KVEntry) -> None:
        with _lock:
            self._acquire()
            self.entries = (*self.entries, entry)

    def detach(self, entry: KVEntry) -> None:
        """Undo :meth:`attach` (nothing when ``entry`` is not attached: an attach that failed)."""
        with _lock:
            if any(e is entry for e in self.entries):
                self.entries = tuple(e for e in self.entries if e is not entry)
                self._release()

    def attach_recorder(self, recorder: Callable[[torch.Tensor, torch.Tensor], None], owner: Owner) -> None:
        with _lock:
            self._acquire()
            self.recorders = (*self.recorders, (recorder, owner))

    def detach_recorder(self, recorder: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        with _lock:
            if any(r[0] is recorder for r in self.recorders):
                self.recorders = tuple(r for r in self.recorders if r[0] is not recorder)
                self._release()

    @property
    def installed(self) -> bool:
        return self._users > 0

    # -- the attention call ----------------------------------------------------------------------
    def sdpa(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any):
        return self._attend(self._inner, query, key, value, args, kwargs, seq_dim=2)

    def _attend(self, inner, query, key, value, args: tuple, kwargs: dict[str, Any], seq_dim: int):
        # dynamo cannot trace a ContextVar read; while it traces, the denoiser lock makes every
        # attachment this call's own.
        tracing = torch.compiler.is_compiling()
        for recorder, owner in self.recorders:
            if tracing or owner.active:
                if seq_dim == 2:  # (B, H, L, D) -> (B, L, H, D)
                    recorder(key.transpose(1, 2), value.transpose(1, 2))
                else:
                    recorder(key, value)
        layout = None
        whole: list[KVEntry] = []
        split: list[tuple[KVEntry, slice]] = []
        for entry in self.entries:
            if not (tracing or entry.call.active):  # another thread's call of the same modules
                continue
            layout = entry.call.layout
            if layout is None:
                continue
            if layout.whole == entry.branch:
                whole.append(entry)
            else:
                rows = layout.rows_of(entry.branch)
                if rows is not None:
                    split.append((entry, rows))
        if whole:
            return self._with_kv(inner, query, key, value, args, kwargs, whole, seq_dim)
        if not split:
            return inner(query, key, value, *args, **kwargs)
        batch = query.shape[0]
        if layout.batch != batch:
            raise RuntimeError(
                f"attention layer {self.name!r}: the call's batch layout covers {layout.batch} rows, "
                f"its attention call has {batch}"
            )
        parts = []
        for _, rows in layout.rows:
            mine = [entry for entry, r in split if r == rows]
            part = [_rows(t, rows, batch) for t in (query, key, value)]
            part_args = tuple(_rows(a, rows, batch) for a in args)
            part_kwargs = {k: _rows(v, rows, batch) for k, v in kwargs.items()}
            if mine:
                parts.append(self._with_kv(inner, *part, part_args, part_kwargs, mine, seq_dim))
            else:
                parts.append(inner(*part, *part_args, **part_kwargs))
        return torch.cat(parts, dim=0)

    def _with_kv(self, inner, query, key, value, args, kwargs, entries: list[KVEntry], seq_dim: int):
        batch = key.shape[0]
        keys, values = [key], [value]
        for entry in entries:
            k, v = _expand_batch(entry.key, batch, self.name), _expand_batch(entry.value, batch, self.name)
            if seq_dim == 2:  # (B, L, H, D) -> (B, H, L, D)
                k, v = k.transpose(1, 2), v.transpose(1, 2)
            keys.append(k.to(device=key.device, dtype=key.dtype))
            values.append(v.to(device=value.device, dtype=value.dtype))
        extra = sum(k.shape[seq_dim] for k in keys[1:])
        key, value = torch.cat(keys, dim=seq_dim), torch.cat(values, dim=seq_dim)
        if args:  # attn_mask given positionally (the fourth parameter of both functions)
            args = (_pad_mask(args[0], extra), *args[1:])
        elif kwargs.get("attn_mask") is not None:
            kwargs = {**kwargs, "attn_mask": _pad_mask(kwargs["attn_mask"], extra)}
        return inner(query, key, value, *args, **kwargs)


def _pad_mask(mask: Any, extra: int) -> Any:
    if mask is None or not extra:
        return mask
    fill = True if mask.dtype == torch.bool else 0.0
    return torch.nn.functional.pad(mask, (0, extra), value=fill)


def _expand_batch(extra: torch.Tensor, batch: int, layer: str) -> torch.Tensor:
    if extra.shape[0] == batch:
        return extra
    if extra.shape[0] == 1:
        return extra.expand(batch, *extra.shape[1:])
    raise ValueError(
        f"kv cache at attention layer {layer!r} has batch size {extra.shape[0]}, the attention call's "
        f"rows of its branch are {batch} (use 1 or {batch})"
    )


def _rows(value: Any, rows: slice, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        return value[rows]
    return value


_lock = threading.RLock()
_points: weakref.WeakKeyDictionary[torch.nn.Module, AttentionPoint] = weakref.WeakKeyDictionary()


def point_for(module: torch.nn.Module, name: str) -> AttentionPoint:
    """The attention point of ``module`` (made on first use, then reused)."""
    with _lock:
        point = _points.get(module)
        if point is None:
            point = _points[module] = AttentionPoint(module, name)
        return point


def installed_points() -> list[AttentionPoint]:
    """Points whose wrapper is installed now (empty when no call is attached anywhere)."""
    with _lock:
        return [point for point in _points.values() if point.installed]
