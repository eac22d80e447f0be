"""The training data set: a folder with ``samples.jsonl``, one row per line::

    {"image": "images/0001.png", "caption": "a red circle", "inputs": {"depth": "depth/0001.png"}}

``image`` is relative to the folder; ``inputs`` are the template's input fields. A string input that
names an existing file relative to the folder becomes its absolute path before validation with the
template's ``Inputs`` schema. Every row is checked before anything is computed, and all problems are
reported at once, each naming the row, the template and the field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusion_templates.errors import TemplateInputError, validate_inputs
from pydantic import BaseModel

from .config import TrainError

SAMPLES = "samples.jsonl"
MAX_REPORTED = 20


@dataclass(frozen=True)
class Row:
    index: int
    """Position among the rows used (0-based); ``line`` is the line in samples.jsonl (1-based)."""
    line: int
    image: Path
    caption: str
    inputs: BaseModel
    files: tuple[Path, ...]
    """Every file the row names (image first): their sizes and dates go into the stage-1 fingerprint."""


def _resolve(value: Any, folder: Path, files: list[Path]) -> Any:
    if isinstance(value, str) and value and not Path(value).is_absolute():
        path = folder / value
        if path.is_file():
            files.append(path.resolve())
            return str(path.resolve())
    if isinstance(value, list):
        return [_resolve(v, folder, files) for v in value]
    return value


def _check_image(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as image:  # reads the header only
            image.size  # noqa: B018
    except Exception as exc:
        return f"cannot read image {path}: {type(exc).__name__}: {exc}"
    return None


def read_rows(folder: Path, template: str, schema: type[BaseModel], max_rows: int | None = None) -> list[Row]:
    """Every row of ``folder/samples.jsonl``, validated; a :class:`TrainError` lists all bad rows."""
    folder = Path(folder)
    samples = folder / SAMPLES
    if not samples.is_file():
        raise TrainError(f"data set {folder}: no {SAMPLES} (one JSON object a line: image, caption, inputs)")
    rows: list[Row] = []
    problems: list[str] = []
    for line_no, text in enumerate(samples.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        if max_rows is not None and len(rows) + len(problems) >= max_rows:
            break
        where = f"{samples}, row {line_no}"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not JSON ({exc})")
            continue
        if not isinstance(record, dict):
            problems.append(f"{where}: expected an object with image, caption, inputs")
            continue
        unknown = sorted(set(record) - {"image", "caption", "inputs"})
        image, caption, fields = record.get("image"), record.get("caption", ""), record.get("inputs", {})
        row_problems = [f"unknown key {k!r} (expected image, caption, inputs)" for k in unknown]
        if not isinstance(image, str) or not image:
            row_problems.append("'image' must be a path relative to the data set folder")
        elif not (folder / image).is_file():
            row_problems.append(f"image {image!r} does not exist in {folder}")
        elif (problem := _check_image(folder / image)) is not None:
            row_problems.append(problem)
        if not isinstance(caption, str):
            row_problems.append(f"'caption' must be a string, got {type(caption).__name__}")
        if not isinstance(fields, dict):
            row_problems.append(f"'inputs' must be an object of template input fields, got {fields!r}")
            fields = {}
        files: list[Path] = [(folder / image).resolve()] if isinstance(image, str) and image else []
        resolved = {k: _resolve(v, folder, files) for k, v in fields.items()}
        inputs = None
        try:
            inputs = validate_inputs(template, schema, resolved)
        except TemplateInputError as exc:
            row_problems += [
                f"template {template!r}, field {field!r}: {message} (got {got!r})"
                for field, message, got in exc.errors
            ]
        except Exception as exc:  # the schema's own validator crashed on this value
            row_problems.append(f"template {template!r}: input validation raised {type(exc).__name__}: {exc}")
        if row_problems:
            problems += [f"{where}: {p}" for p in row_problems]
            continue
        rows.append(Row(len(rows), line_no, files[0], caption, inputs, tuple(files)))
    if problems:
        shown = problems[:MAX_REPORTED]
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise TrainError(
            f"data set {folder} has {len(problems)} bad row(s) for template {template!r}:\n  "
            + "\n  ".join(shown)
            + more
        )
    if not rows:
        raise TrainError(f"data set {folder}: {SAMPLES} has no rows")
    return rows


def data_fingerprint(folder: Path, rows: list[Row]) -> str:
    """The rows' content: samples.jsonl's bytes and every named file's size and modification time."""
    digest = hashlib.sha256((Path(folder) / SAMPLES).read_bytes())
    for row in rows:
        for path in row.files:
            stat = path.stat()
            digest.update(f"{row.index}:{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
