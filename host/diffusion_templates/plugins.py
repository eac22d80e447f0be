"""Finding, loading and calling plugins.

Discovery reads installed package metadata only: entry points in the groups below, the
distribution's version, its ``Requires-Dist`` on ``diffusion-templates`` (the host versions it
supports) and its ``dt-carrier:<name>`` / ``dt-backbone:<name>`` keywords (what ``dt list`` shows
without importing anything). A plugin module is imported the first time it is used. A plugin that
cannot be loaded is skipped and reported; it never takes the host down.

One broken distribution never breaks the others: metadata is read one distribution and one entry
point line at a time (``installed.py``), so a distribution with no ``Name``, an unreadable METADATA
or an entry point value that is not ``module:attr`` is listed as ``broken``, with the reason, and
never imported. Anything a plugin raises while it loads (``SystemExit`` and a ``KeyboardInterrupt``
of its own included) makes that plugin ``error``; the user's Ctrl-C still stops the program
(``interrupts.py`` tells the two apart).

``DT_LOAD_PLUGINS`` (comma-separated plugin or distribution names) loads only those;
``DT_DISABLE_PLUGINS`` skips the ones named. The host's own carriers and backbones always load.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import pluggy
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from . import __version__, hookspecs, installed
from .errors import PluginError, UnknownTemplateError
from .interrupts import InterruptWatch

HOST_DISTRIBUTION = "diffusion-templates"
GROUPS = {
    "template": "diffusion_templates.templates",
    "carrier": "diffusion_templates.carriers",
    "backbone": "diffusion_templates.backbones",
}


@dataclass
class PluginInfo:
    """What metadata says about one entry point, and how loading it went."""

    kind: str
    name: str
    value: str
    distribution: str
    version: str
    carriers: tuple[str, ...] = ()
    backbones: tuple[str, ...] = ()
    host_requires: str | None = None
    # not loaded | loaded | incompatible | disabled | conflict | broken (its metadata; never imported)
    # | error (it failed to load)
    status: str = "not loaded"
    problem: str | None = None
    entry_point: Any = field(default=None, repr=False, compare=False)
    #: ``(category, message)`` for ``dt doctor`` once something went wrong ("bad entry point", ...).
    diagnosis: tuple[str, str] | None = field(default=None, repr=False, compare=False)

    @property
    def usable(self) -> bool:
        return self.status in ("not loaded", "loaded")

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "carriers": list(self.carriers),
            "backbones": list(self.backbones),
            "host_requires": self.host_requires,
            "status": self.status,
            "problem": self.problem,
        }


def _env_names(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _host_requirement(dist: installed.Distribution) -> str | None:
    for line in dist.requires or ():
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) == HOST_DISTRIBUTION and not req.marker:
            return str(req.specifier) or None
    return None


def _keywords(dist: installed.Distribution, prefix: str, template: str | None = None) -> tuple[str, ...]:
    """``prefix<value>`` keywords of a distribution; for ``template``, ``prefix<value>@<template>`` ones.

    A distribution registering several templates with different carriers or backbones scopes each
    keyword to its template (``dt-carrier:kv@brightness-kv``); a template with no scoped keyword of
    that kind gets the distribution's unscoped ones.
    """
    raw = dist.metadata.get("Keywords") or ""
    words = [w.strip() for w in raw.replace(" ", ",").split(",")]
    found = [w[len(prefix) :] for w in words if w.startswith(prefix)]
    if template is not None:
        scoped = [w.rpartition("@")[0] for w in found if w.rpartition("@")[2] == template and "@" in w]
        if scoped:
            return tuple(scoped)
    return tuple(w for w in found if "@" not in w)


def discover() -> list[PluginInfo]:
    """Every plugin entry point, from metadata alone (imports no plugin, torch or diffusers)."""
    allow, deny = _env_names("DT_LOAD_PLUGINS"), _env_names("DT_DISABLE_PLUGINS") or set()
    entries = installed.entries(GROUPS.values())
    infos: list[PluginInfo] = []
    for kind, group in GROUPS.items():
        for entry in (e for e in entries if e.group == group):
            dist = entry.dist
            info = PluginInfo(
                kind=kind, name=entry.name, value=entry.value, distribution=dist.name, version=dist.version
            )
            if kind == "template":
                info.carriers = _keywords(dist, "dt-carrier:", entry.name)
                info.backbones = _keywords(dist, "dt-backbone:", entry.name)
            elif kind == "carrier":
                info.carriers = (entry.name,)
            else:
                info.backbones = (entry.name,)
            infos.append(info)
            if entry.problem is not None:
                info.status, info.problem = "broken", entry.problem
                info.diagnosis = (entry.category or "broken", f"broken: {entry.problem}")
                continue
            info.entry_point = entry.entry_point()
            own = canonicalize_name(dist.name) == HOST_DISTRIBUTION
            if not own:
                info.host_requires = _host_requirement(dist)
                if info.host_requires and __version__ not in _specifier(info.host_requires):
                    info.status = "incompatible"
                    info.problem = (
                        f"supports diffusion-templates {info.host_requires}, this host is {__version__}"
                    )
            if info.usable and not own:
                names = {entry.name, dist.name, canonicalize_name(dist.name)}
                if (allow is not None and not names & allow) or names & deny:
                    info.status = "disabled"
                    info.problem = "disabled by DT_LOAD_PLUGINS / DT_DISABLE_PLUGINS"
    _flag_conflicts(infos)
    return infos


def _specifier(spec: str):
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(spec, prereleases=True)


def _flag_conflicts(infos: list[PluginInfo]) -> None:
    """Two usable distributions registering one name: neither wins silently. The host's own
    carriers and backbones are the exception: they stay, the newcomer is flagged."""
    by_name: dict[tuple[str, str], list[PluginInfo]] = {}
    for info in infos:
        if info.usable:
            by_name.setdefault((info.kind, info.name), []).append(info)
    for (kind, name), group in by_name.items():
        dists = sorted({i.distribution for i in group})
        if len(dists) < 2:
            continue
        own = [i for i in group if canonicalize_name(i.distribution) == HOST_DISTRIBUTION]
        for info in group:
            if info in own:
                continue
            info.status = "conflict"
            info.problem = f"{kind} name {name!r} is registered by several distributions: {', '.join(dists)}"
            if own:
                info.problem += " (the host's own one is used)"


class PluginHost:
    """The plugin manager: discovered infos, lazily loaded plugin objects, hook calls."""

    def __init__(self, infos: list[PluginInfo] | None = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.infos = discover() if infos is None else infos
        self._objects: dict[tuple[str, str], Any] = {}
        self._lock = threading.RLock()

    # -- lookup ------------------------------------------------------------------------------------
    def info(self, kind: str, name: str) -> PluginInfo | None:
        """The entry for ``name``: a usable one if any (a disabled or conflicting duplicate, e.g. a
        third party's ``kv``, must not hide the host's own), else the first, for its problem."""
        matches = [info for info in self.infos if info.kind == kind and info.name == name]
        return next((i for i in matches if i.usable), matches[0] if matches else None)

    def names(self, kind: str) -> list[str]:
        return sorted(i.name for i in self.infos if i.kind == kind and i.usable)

    def get(self, kind: str, name: str) -> Any:
        """The loaded plugin object, importing it on first use."""
        with self._lock:
            if (kind, name) in self._objects:
                return self._objects[(kind, name)]
            info = self.info(kind, name)
            if info is None:
                available = ", ".join(self.names(kind)) or "none installed"
                error = UnknownTemplateError if kind == "template" else PluginError
                raise error(f"no {kind} named {name!r} is installed (available: {available})", plugin=name)
            if not info.usable:
                raise PluginError(
                    f"is {info.status}: {info.problem}", plugin=name, distribution=info.distribution
                )
            obj = self._load_reporting(info)
            info.status = "loaded"
            self._objects[(kind, name)] = obj
            return obj

    def _load_reporting(self, info: PluginInfo) -> Any:
        """``_load``; whatever the plugin raises becomes a ``PluginError`` naming it, and its status.

        ``BaseException`` is caught on purpose: a plugin calling ``sys.exit()`` at import, or raising
        ``KeyboardInterrupt`` itself, must not end ``dt doctor`` or a server. A ``KeyboardInterrupt``
        from a real Ctrl-C (the user's) propagates; ``InterruptWatch`` says which one it is.
        """
        stage = ["import"]
        with InterruptWatch() as watch:
            try:
                return self._load(info, stage)
            except BaseException as exc:
                if watch.is_users(exc):
                    raise  # the user's Ctrl-C (as a KeyboardInterrupt once the watch ends), not the plugin's
                info.status, info.problem = "error", _describe(exc)
                info.diagnosis = _diagnose(info, exc, stage[0])
                raise PluginError(
                    f"failed to load: {info.problem}", plugin=info.name, distribution=info.distribution
                ) from exc

    def _load(self, info: PluginInfo, stage: list[str]) -> Any:
        obj = info.entry_point.load()
        stage[0] = "setup"  # imported: what fails from here on is the object, not its module
        if inspect.isclass(obj) and info.kind != "backbone":  # adapters are instantiated per pipeline
            obj = obj()
        _check_shape(info, obj)
        if info.kind != "backbone":
            self.pm.register(obj, name=f"{info.kind}:{info.name}")
        return obj

    def register(self, kind: str, name: str, obj: Any, distribution: str = "<registered in code>") -> None:
        """Register a plugin object directly (notebooks, tests): no entry point needed."""
        with self._lock:
            info = PluginInfo(
                kind=kind,
                name=name,
                value=repr(obj),
                distribution=distribution,
                version="",
                carriers=tuple(getattr(obj, "carriers", ()) or ()),
                backbones=tuple(b for b in getattr(obj, "backbones", ()) or () if b != "*"),
                status="loaded",
            )
            if inspect.isclass(obj) and kind != "backbone":
                obj = obj()
            _check_shape(info, obj)
            if self.info(kind, name) is not None:
                raise PluginError(f"a {kind} named {name!r} is already registered", plugin=name)
            if kind != "backbone":
                self.pm.register(obj, name=f"{kind}:{name}")
            self.infos.append(info)
            self._objects[(kind, name)] = obj

    def load_all(self) -> list[PluginInfo]:
        """Import every usable plugin (for ``dt doctor``); failures are recorded, not raised."""
        for info in self.infos:
            if info.usable:
                try:
                    self.get(info.kind, info.name)
                except PluginError:
                    pass
        return self.infos

    # -- hooks ---------------------------------------------------------------------------------------
    def call(self, kind: str, name: str, hook: str, **kwargs: Any) -> Any:
        """Call ``hook`` on the one plugin that owns ``name`` (no other plugin sees the call)."""
        owner = self.get(kind, name)
        info = self.info(kind, name)
        # Only the owner's implementations, newest first as pluggy orders them (firstresult). Selected
        # here rather than with pm.subset_hook_caller, whose filtering differs across pluggy versions.
        impls = [impl for impl in getattr(self.pm.hook, hook).get_hookimpls() if impl.plugin is owner]
        if not impls:
            raise PluginError(f"implements no {hook!r} hook", plugin=name, distribution=info.distribution)

        def caller(**kw: Any) -> Any:
            for impl in reversed(impls):
                result = impl.function(*(kw[arg] for arg in impl.argnames))
                if result is not None:
                    return result
            return None

        try:
            return caller(**kwargs)
        except (Exception, SystemExit) as exc:  # a plugin's sys.exit() ends its call, not the process
            from .errors import TemplateError

            if isinstance(exc, TemplateError):
                raise
            raise PluginError(
                f"hook {hook!r} raised {type(exc).__name__}: {exc}",
                plugin=name,
                distribution=info.distribution,
            ) from exc

    # -- backbones -------------------------------------------------------------------------------------
    def adapter_for(self, pipe: Any):
        """An adapter instance for ``pipe``'s denoiser; a clear error listing what is supported."""
        from .errors import UnsupportedError

        tried = []
        for name in self.names("backbone"):
            try:
                adapter_cls = self.get("backbone", name)
            except PluginError:
                continue
            tried.append(f"{name} ({', '.join(adapter_cls.denoiser_classes)})")
            if adapter_cls.matches(pipe):
                return adapter_cls(pipe)
        from .backbones.base import unwrap_compiled

        denoiser = unwrap_compiled(getattr(pipe, "transformer", None) or getattr(pipe, "unet", None))
        raise UnsupportedError(
            f"{type(pipe).__name__} with denoiser {type(denoiser).__name__} is not supported by any "
            "installed "
            f"backbone adapter; supported: {'; '.join(tried) or 'none'}"
        )


def _describe(exc: BaseException) -> str:
    """``Type: message``, with what ``SystemExit`` and ``KeyboardInterrupt`` mean here."""
    if isinstance(exc, SystemExit):
        return f"SystemExit: the plugin called sys.exit({exc.code!r})"
    if isinstance(exc, KeyboardInterrupt):
        return "KeyboardInterrupt raised by the plugin itself (not a Ctrl-C)"
    return f"{type(exc).__name__}: {exc}"


def _diagnose(info: PluginInfo, exc: BaseException, stage: str) -> tuple[str, str]:
    """``dt doctor``'s category and message: a bad entry point (no such module or attribute), a module
    that raised at import, or an object that failed once imported. Decided from the exception and
    ``sys.modules`` alone: importing anything again could run the plugin's failing code twice."""
    ep = info.entry_point
    if stage == "setup":
        return "load failed", f"failed to load: {info.problem}"
    missing = (exc.name or "") if isinstance(exc, ModuleNotFoundError) else ""
    if missing and (ep.module == missing or ep.module.startswith(missing + ".")):
        return "bad entry point", f"bad entry point {ep.value!r}: there is no module named {ep.module!r}"
    if isinstance(exc, AttributeError) and ep.module in sys.modules:  # imported, but no such attribute
        return "bad entry point", (
            f"bad entry point {ep.value!r}: module {ep.module!r} has no attribute {ep.attr!r}"
        )
    return "import error", f"raised at import: {info.problem}"


def _check_shape(info: PluginInfo, obj: Any) -> None:
    """A loaded plugin must look like its kind; say what is missing, naming plugin and distribution."""
    from pydantic import BaseModel

    def fail(msg: str) -> None:
        raise PluginError(msg, plugin=info.name, distribution=info.distribution)

    if info.kind == "template":
        inputs = getattr(obj, "Inputs", None)
        if not (inspect.isclass(inputs) and issubclass(inputs, BaseModel)):
            fail("a template plugin must define `Inputs`, a pydantic BaseModel subclass")
    elif info.kind == "carrier":
        if not hasattr(obj, "supports"):
            fail("a carrier plugin must define `supports(adapter)`")
    elif info.kind == "backbone":
        if not (inspect.isclass(obj) or hasattr(obj, "matches")):
            fail("a backbone plugin must be a BackboneAdapter subclass")


_default: PluginHost | None = None
_default_lock = threading.Lock()


def default_host() -> PluginHost:
    """The process-wide plugin host (discovery runs once)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = PluginHost()
        return _default


def reset_default_host() -> None:
    """Forget discovered plugins (after installing one at run time, and in tests)."""
    global _default
    with _default_lock:
        _default = None
