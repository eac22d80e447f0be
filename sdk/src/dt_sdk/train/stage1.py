"""The stage-1 cache: everything that needs no gradient, computed once and kept on disk.

A folder of safetensors shards plus ``index.json``, written last (a folder without it is
incomplete). Per row: the objective's tensors (``x0``, ``text``, their position ids...) under
``<row>.data.<name>``, and ``process_inputs``' tensors under ``<row>.inputs.<name>``; its plain values
live in the index. The index carries a fingerprint of the base model, the template and the data
set; stage 2 refuses a cache whose fingerprint differs from the run's (a stale cache would train
silently on other latents, captions or inputs).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import StaleCacheError, TrainError

INDEX = "index.json"
FORMAT = 1
SHARD_ROWS = 256

Features = tuple[dict[str, torch.Tensor], dict[str, Any]]  # (objective tensors, forward kwargs)


def check_value(name: str, value: Any) -> None:
    """A plain (non-tensor) ``process_inputs`` value must survive JSON unchanged."""
    try:
        same = json.loads(json.dumps(value)) == value
    except (TypeError, ValueError):
        same = False
    if not same:
        raise TrainError(
            f"process_inputs returned {type(value).__name__} for {name!r}: stage 1 keeps tensors (leading "
            "batch dim 1) and JSON values (numbers, strings, lists, dicts) only"
        )


class Stage1Writer:
    def __init__(self, folder: Path, fingerprint: dict[str, str]):
        self.folder, self.fingerprint = Path(folder), fingerprint
        if self.folder.exists():
            shutil.rmtree(self.folder)  # never mix shards of two runs
        self.folder.mkdir(parents=True)
        self.rows: list[dict[str, Any]] = []
        self.shards: list[str] = []
        self._pending: dict[str, torch.Tensor] = {}

    def add(self, data: dict[str, torch.Tensor], inputs: dict[str, Any]) -> None:
        row = len(self.rows)
        values = {}
        for name, tensor in data.items():
            self._pending[f"{row}.data.{name}"] = tensor.detach().cpu().contiguous()
        for name, value in inputs.items():
            if isinstance(value, torch.Tensor):
                self._pending[f"{row}.inputs.{name}"] = value.detach().cpu().contiguous()
            else:
                check_value(name, value)
                values[name] = value
        self.rows.append({"shard": len(self.shards), "values": values})
        if len(self.rows) % SHARD_ROWS == 0:
            self._flush()

    def add_extra(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors shared by all rows (the empty caption's embedding), kept in the last shard."""
        for name, tensor in tensors.items():
            self._pending[f"{prefix}.{name}"] = tensor.detach().cpu().contiguous()

    def _flush(self) -> None:
        if self._pending:
            name = f"shard-{len(self.shards):05d}.safetensors"
            save_file(self._pending, str(self.folder / name))
            self.shards.append(name)
            self._pending = {}

    def close(self) -> Path:
        extras = {k for k in self._pending if not k[0].isdigit()}
        self._flush()
        index = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "shards": self.shards,
            "extras": {"shard": len(self.shards) - 1, "keys": sorted(extras)},
            "rows": self.rows,
        }
        (self.folder / INDEX).write_text(json.dumps(index, indent=1))
        return self.folder


def read_index(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / INDEX
    return json.loads(path.read_text()) if path.is_file() else None


def check_fingerprint(folder: Path, index: dict[str, Any], fingerprint: dict[str, str]) -> None:
    if index.get("format") != FORMAT:
        raise StaleCacheError(f"stage-1 cache {folder} has format {index.get('format')}, expected {FORMAT}")
    theirs = index.get("fingerprint", {})
    differ = sorted(k for k in fingerprint if theirs.get(k) != fingerprint[k])
    if differ:
        raise StaleCacheError(
            f"stage-1 cache {folder} was made for another {' and '.join(differ)} than this run's; "
            "recompute it (dt train --stage precompute, or delete the folder) or pass another --cache-dir"
        )


class Stage1Reader:
    """Rows of a stage-1 cache, read lazily from memory-mapped shards."""

    def __init__(self, folder: Path, fingerprint: dict[str, str]):
        self.folder = Path(folder)
        index = read_index(self.folder)
        if index is None:
            raise TrainError(f"stage-1 cache {self.folder} is missing or incomplete (no {INDEX})")
        check_fingerprint(self.folder, index, fingerprint)
        self.index = index
        self._files = [safe_open(str(self.folder / s), framework="pt") for s in index["shards"]]
        self._row_keys: list[dict[str, list[str]]] = []  # per shard: row -> its tensor keys
        for shard in self._files:
            by_row: dict[str, list[str]] = {}
            for key in shard.keys():
                by_row.setdefault(key.split(".", 1)[0], []).append(key)
            self._row_keys.append(by_row)

    def __len__(self) -> int:
        return len(self.index["rows"])

    def extra(self, prefix: str) -> dict[str, torch.Tensor]:
        shard = self._files[self.index["extras"]["shard"]]
        keys = [k for k in self.index["extras"]["keys"] if k.startswith(prefix + ".")]
        return {k[len(prefix) + 1 :]: shard.get_tensor(k) for k in keys}

    def __getitem__(self, row: int) -> Features:
        entry = self.index["rows"][row]
        shard = self._files[entry["shard"]]
        data, inputs = {}, dict(entry["values"])
        for key in self._row_keys[entry["shard"]].get(str(row), []):
            _, kind, name = key.split(".", 2)
            (data if kind == "data" else inputs)[name] = shard.get_tensor(key)
        return data, inputs
