"""Refusing pickle weights unless the user allows them explicitly.

Unpickling a file can run any code it carries. diffusers' ``from_pretrained`` loads ``.bin``
weights whenever a folder has no safetensors (its ``use_safetensors=None`` default), so every
loader of this project passes ``use_safetensors=True`` unless the caller passed
``allow_pickle=True`` (``--allow-pickle`` on the command line). A local folder is checked before
anything is loaded, so the error names the pickle files instead of diffusers' "no file named
...safetensors" for whichever component it reached first; for a hub id, diffusers' own refusal
(raised before any download) is turned into the same error.

Only weights a loader would read count: a pickle file beside safetensors weights is never
unpickled when ``use_safetensors=True`` (and neither is a stray ``training_args.bin`` at the top of
a pipeline folder).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .errors import TemplateError

#: File endings of pickled weights (torch.save, diffusers/transformers ``.bin``, checkpoints).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

HINT = "pass --allow-pickle (allow_pickle=True in Python) to load them, only if you trust their source"

T = TypeVar("T")


class PickleWeightsError(TemplateError, ValueError):
    """A folder or hub id holds weights only as pickles, and pickles were not allowed."""


def _model_folders(folder: Path) -> list[Path]:
    """The folders a loader reads weights from: each component of a pipeline (``model_index.json``),
    else the folder itself (one model)."""
    index = folder / "model_index.json"
    if not index.is_file():
        return [folder]
    try:
        entries = json.loads(index.read_text())
    except (OSError, ValueError):
        return [p for p in sorted(folder.iterdir()) if p.is_dir()]  # diffusers will refuse it anyway
    # Components are ``"name": [library, class]``; ``_class_name`` and the like are settings.
    names = [name for name, value in entries.items() if not name.startswith("_") and isinstance(value, list)]
    return [folder / name for name in names if (folder / name).is_dir()]


def pickle_weights(folder: str | os.PathLike) -> list[str]:
    """Pickle weight files that loading ``folder`` would need (paths relative to it), or []."""
    root = Path(folder)
    found: list[str] = []
    for model in _model_folders(root):
        files = [p for p in sorted(model.iterdir()) if p.is_file()]
        if any(p.name.endswith(".safetensors") for p in files):
            continue  # use_safetensors=True reads these and never the pickles beside them
        found += [str(p.relative_to(root)) for p in files if p.name.lower().endswith(PICKLE_SUFFIXES)]
    return found


def refuse_pickle(source: str | os.PathLike) -> None:
    """Raise :class:`PickleWeightsError` if the local folder ``source`` holds weights only as pickles."""
    if not Path(source).is_dir():
        return
    found = pickle_weights(source)
    if found:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise PickleWeightsError(f"{os.fspath(source)} contains pickle weights ({shown}); {HINT}")


def from_pretrained(
    load: Callable[..., T], source: str | os.PathLike, *, allow_pickle: bool = False, **kwargs: Any
) -> T:
    """``load(source, **kwargs)`` (a diffusers or transformers ``from_pretrained``) that reads no
    pickle unless ``allow_pickle``: the folder is checked first and ``use_safetensors=True`` is passed.
    With ``allow_pickle`` the library's own default applies (safetensors first, else ``.bin``)."""
    if allow_pickle:
        return load(source, **kwargs)
    kwargs.pop("use_safetensors", None)  # not the caller's to lower: only allow_pickle lets pickles in
    refuse_pickle(Path(source) / kwargs["subfolder"] if kwargs.get("subfolder") else source)
    try:
        return load(source, use_safetensors=True, **kwargs)
    except OSError as exc:  # a hub id whose repository has only pickles: diffusers refuses before downloading
        if "safetensors" not in str(exc) or Path(source).is_dir():
            raise
        raise PickleWeightsError(
            f"{os.fspath(source)} has no safetensors weights, only pickle ones ({exc}); {HINT}"
        ) from exc
