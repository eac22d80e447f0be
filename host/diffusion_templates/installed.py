"""Entry points of installed distributions, read so that one broken distribution hides no other.

``importlib.metadata.entry_points()`` parses every distribution's ``entry_points.txt`` in one go: a
single malformed line anywhere raises for all of them. A distribution whose METADATA has no ``Name``
(an interrupted install) comes back with ``Name`` None, which ``packaging`` cannot canonicalise, and
an entry point value that is not ``module:attr`` makes ``EntryPoint.module`` raise. Here each
distribution is read on its own, inside its own ``try``, and each line of its ``entry_points.txt``
on its own: whatever is wrong becomes the ``problem`` of the entries it concerns, and every other
entry reads as usual. Only the groups asked for are parsed, and METADATA is read only for
distributions that have such entries, so this stays as cheap as ``entry_points()``. Imports no
plugin, torch or diffusers.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email.message import Message
from importlib import metadata

from packaging.utils import canonicalize_name

UNNAMED = "<unnamed>"
"""The distribution name shown for a distribution whose METADATA has no ``Name``."""

# ``module``, ``module:attr`` or either followed by ``[extras]``; each part a dotted identifier
# (checked with str.isidentifier below, stricter than importlib's own ``[\w.]+``).
_VALUE = re.compile(r"^(?P<module>[^\s:\[\]]+)\s*(?::\s*(?P<attr>[^\s:\[\]]+)\s*)?(?:\[[^\]]*\]\s*)?$")


@dataclass(frozen=True)
class Distribution:
    """What one installed distribution's metadata says (``problem``: why it cannot be trusted)."""

    name: str
    version: str
    location: str
    metadata: Message
    requires: tuple[str, ...] = ()
    problem: str | None = None


@dataclass(frozen=True)
class Entry:
    """One entry point line; ``problem`` says why it cannot be used (its own or its distribution's)."""

    group: str
    name: str
    value: str
    dist: Distribution
    problem: str | None = None
    category: str | None = None  # "bad entry point" | "broken distribution" when there is a problem

    def entry_point(self) -> metadata.EntryPoint:
        """The importlib entry point (only for an entry without a problem: its value parses)."""
        return metadata.EntryPoint(name=self.name, value=self.value, group=self.group)


def check_value(value: str) -> str | None:
    """Why ``value`` is not a loadable entry point value (``module`` or ``module:attr``), or None."""
    match = _VALUE.match(value)
    parts = [] if match is None else [match["module"], *([match["attr"]] if match["attr"] else [])]
    if match is None or not all(all(p.isidentifier() for p in part.split(".")) for part in parts):
        return f"bad entry point value {value!r}: expected 'module:attribute' (dotted Python names)"
    return None


def entries(groups: Iterable[str]) -> list[Entry]:
    """Every entry point in ``groups``, in ``sys.path`` order; never raises for a broken distribution.

    A distribution installed twice keeps only its first copy on the path, as importlib does; one
    without a ``Name`` cannot be matched with another copy, so each such copy is listed.
    """
    wanted = tuple(groups)
    found: list[Entry] = []
    seen: set[str] = set()
    for dist in _distributions():
        try:
            text = dist.read_text("entry_points.txt") or ""
        except Exception:  # undecodable or unreadable: nothing says it is a plugin at all
            continue
        if not any(f"[{group}]" in text for group in wanted):
            continue  # the common case (most distributions are no plugin): METADATA is not read
        info = _read_distribution(dist)
        if info.name != UNNAMED:
            key = canonicalize_name(info.name)
            if key in seen:
                continue
            seen.add(key)
        found.extend(_parse(text, wanted, info))
    return found


def _distributions() -> Iterator[metadata.Distribution]:
    """``importlib.metadata.distributions()``; if a custom finder raises, each path entry on its own."""
    try:
        yield from list(metadata.distributions())
        return
    except Exception:
        pass
    for path in sys.path:
        try:
            yield from list(metadata.distributions(path=[path]))
        except Exception:
            continue


def _read_distribution(dist: metadata.Distribution) -> Distribution:
    location = _location(dist)
    try:
        meta = dist.metadata
        name = meta.get("Name")
        version = meta.get("Version") or ""
        requires = tuple(dist.requires or ())
    except Exception as exc:  # e.g. METADATA that is not UTF-8
        problem = f"its metadata cannot be read ({type(exc).__name__}: {exc}); reinstall it (in {location})"
        return Distribution(UNNAMED, "", location, Message(), problem=problem)
    if not isinstance(name, str) or not name.strip():
        problem = (
            f"its METADATA has no Name (an interrupted or broken install): reinstall it or remove its "
            f".dist-info folder (in {location})"
        )
        return Distribution(UNNAMED, str(version), location, meta, requires, problem)
    return Distribution(name.strip(), str(version), location, meta, requires)


def _location(dist: metadata.Distribution) -> str:
    try:
        return str(dist.locate_file(""))
    except Exception:
        return "an unknown location"


def _parse(text: str, groups: tuple[str, ...], dist: Distribution) -> Iterator[Entry]:
    """The lines of ``entry_points.txt`` in ``groups``, each checked alone (the format importlib reads:
    ``[group]`` headers, ``name = value`` lines, ``#`` comments)."""
    group: str | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            group = line[1:-1].strip()
            continue
        if group not in groups:
            continue
        name, sep, value = (part.strip() for part in line.partition("="))
        if dist.problem is not None:
            yield Entry(group, name or line, value, dist, dist.problem, "broken distribution")
        elif not sep or not name:
            problem = (
                f"line {number} of its entry_points.txt is {line!r}, not 'name = module:attribute' (such a "
                "line also breaks importlib.metadata.entry_points() for every program, torch included)"
            )
            yield Entry(group, name or line, value, dist, problem, "bad entry point")
        elif (problem := check_value(value)) is not None:
            yield Entry(group, name, value, dist, problem, "bad entry point")
        else:
            yield Entry(group, name, value, dist)
