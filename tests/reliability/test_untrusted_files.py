"""Untrusted files: caches and Template model weights load through safetensors only, and checked.

``TemplateCache.load`` parses the safetensors header itself before safetensors opens the file: a
file with a lying or absurd header is refused without reading (or allocating) its data -- the
tests replace ``safe_open`` with a tripwire to prove it. Wrong shapes, wrong dtypes, NaN/Inf values
and malformed metadata are refused too, each with a ``CacheError`` that names the problem. No code
path of the host unpickles: a source scan finds no ``pickle``/``torch.load`` use, and
``TemplateModel.from_pretrained`` refuses folders with code or with only pickled weights.
"""

from __future__ import annotations

import ast
import json
import struct
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from diffusers.configuration_utils import register_to_config
from safetensors.torch import save_file

import diffusion_templates
from diffusion_templates import CacheError, KVCache, LoraCache, TemplateCache, TemplateError, TemplateModel
from diffusion_templates import cache as cache_module

META = "diffusion_templates.cache"


def kv_cache() -> KVCache:
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 3, 2, 16, generator=g), torch.randn(1, 3, 2, 16, generator=g)
    return KVCache(keys={"double_0": k}, values={"double_0": v}, template="t")


def lora_cache() -> LoraCache:
    g = torch.Generator().manual_seed(1)
    return LoraCache(
        down={"a.to_q": torch.randn(4, 8, generator=g)},
        up={"a.to_q": torch.randn(6, 4, generator=g)},
        scaling={"a.to_q": 0.5},
    )


def write(path: Path, tensors: dict[str, torch.Tensor], carrier: str = "kv", **meta: Any) -> Path:
    """A cache file written the way ``save`` writes it, with tensors and metadata as given."""
    layout = {"keys": "dict", "values": "dict"} if carrier == "kv" else {"down": "dict", "up": "dict"}
    info = {"format": 1, "carrier": carrier, "fields": {"template": None}, "layout": layout, **meta}
    save_file(tensors, str(path), metadata={META: json.dumps(info)})
    return path


def raw_file(path: Path, header: Any, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors-shaped file with any header (and a header length that may lie)."""
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def header_of(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


@pytest.fixture
def tripwire(monkeypatch):
    """Fail if safetensors is asked to open the file: the header check must have refused it first."""

    def safe_open(*args, **kwargs):
        raise AssertionError("safetensors opened a file the header check should have refused")

    monkeypatch.setattr(cache_module, "safe_open", safe_open)


def k4(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.ones(*shape).to(dtype)


# -- refused from the header alone (safetensors never opens the file) ---------------------------------------
def _lying(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    kv = tmp_path / "kv.safetensors"
    kv_cache().save(kv)
    header, data = header_of(kv)
    name = "keys/double_0"
    cases: dict[str, tuple[Path, str]] = {}

    def variant(label: str, change, match: str, data_bytes: bytes = data) -> None:
        h = json.loads(json.dumps(header))
        change(h)
        cases[label] = (raw_file(tmp_path / f"{label}.safetensors", h, data_bytes), match)

    variant("offsets past the end", lambda h: h[name].update(data_offsets=[0, 10**6]), "span|past the end")
    variant("offsets beyond data", lambda h: h[name].update(data_offsets=[len(data) - 8, len(data) + 376]),
            "run past the end of the data")  # fmt: skip
    variant("shape vs bytes", lambda h: h[name].update(shape=[1, 4, 2, 16]), "span 384 bytes, but shape")
    variant("absurd shape", lambda h: h[name].update(shape=[10**12]), "declares 4000000000000 bytes")
    variant(
        "absurd, consistent offsets",
        lambda h: h[name].update(shape=[10**6, 10**6], data_offsets=[0, 4 * 10**12]),
        "more than the limit",
    )
    variant("negative dim", lambda h: h[name].update(shape=[1, -3, 2, 16]), "non-negative integers")
    variant("float dim", lambda h: h[name].update(shape=[1, 3.0, 2, 16]), "non-negative integers")
    variant("unknown dtype", lambda h: h[name].update(dtype="C64"), "dtype 'C64' is not allowed")
    variant("unsigned dtype", lambda h: h[name].update(dtype="U32"), "dtype 'U32' is not allowed")
    variant("overlap", lambda h: h["values/double_0"].update(data_offsets=h[name]["data_offsets"]), "overlap")
    variant(
        "extra entry key", lambda h: h[name].update(offsets=[0, 1]), "exactly dtype, shape and data_offsets"
    )
    variant("trailing data", lambda h: None, "holds 776 bytes of data", data + b"\0" * 8)
    variant("metadata not strings", lambda h: h["__metadata__"].update(x=1), "map strings to strings")
    cases["header length past end"] = (raw_file(tmp_path / "hl.safetensors", header, data, length=10**9),
                                       "header length 1000000000 bytes runs past the end")  # fmt: skip
    cases["header length cuts json"] = (raw_file(tmp_path / "hc.safetensors", header, data, length=20),
                                        "header is not JSON")  # fmt: skip
    cases["header not an object"] = (raw_file(tmp_path / "ha.safetensors", [1, 2, 3]), "not an object")
    cases["header not utf-8"] = (raw_file(tmp_path / "hu.safetensors", b"\xff\xfe{}"), "not JSON")
    cases["deeply nested header"] = (raw_file(tmp_path / "hn.safetensors", b"[" * 100_000), "not JSON")
    for cut in (0, 5, 8, 40):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(kv.read_bytes()[:cut])
        cases[f"truncated to {cut} bytes"] = (path, "truncated|runs past the end")
    return cases


def test_lying_truncated_and_absurd_headers_are_refused_before_reading(tmp_path, tripwire, tally):
    cases = _lying(tmp_path)
    for label, (path, match) in cases.items():
        with pytest.raises(CacheError, match=match) as info:
            TemplateCache.load(path)
        assert str(path) in str(info.value) and "unreadable cache file" in str(info.value), label
    tally["files.malformed_rejected"] += len(cases)


def test_truncated_data_is_refused(tmp_path, tripwire, tally):
    path = tmp_path / "kv.safetensors"
    kv_cache().save(path)
    raw = path.read_bytes()
    for cut in range(len(raw) - 1, len(raw) - 800, -97):  # cut inside the tensor data
        path.write_bytes(raw[:cut])
        with pytest.raises(CacheError, match="past the end|cover"):
            TemplateCache.load(path)
        tally["files.malformed_rejected"] += 1


def test_total_size_bound_is_configurable(tmp_path, monkeypatch, tripwire, tally):
    path = tmp_path / "kv.safetensors"
    kv_cache().save(path)  # 2 x 384 bytes of tensors
    monkeypatch.setenv("DT_MAX_CACHE_BYTES", "500")
    with pytest.raises(CacheError, match=r"more than 500 bytes in total \(DT_MAX_CACHE_BYTES\)"):
        TemplateCache.load(path)
    monkeypatch.setenv("DT_MAX_CACHE_BYTES", "300")
    with pytest.raises(CacheError, match=r"declares 384 bytes, more than the limit of 300 bytes"):
        TemplateCache.load(path)
    monkeypatch.setenv("DT_MAX_CACHE_BYTES", "lots")
    with pytest.raises(ValueError, match="DT_MAX_CACHE_BYTES='lots': expected a positive integer"):
        TemplateCache.load(path)
    tally["files.malformed_rejected"] += 2


# -- refused after the header check: contents ---------------------------------------------------------------
def test_wrong_shapes_dtypes_and_values_are_refused(tmp_path, tally):
    cases = {
        "kv ndim 3": (
            write(tmp_path / "a.st", {"keys/l": k4(1, 3, 16), "values/l": k4(1, 3, 16)}),
            "must be \\(B, L, heads, head_dim\\)",
        ),
        "kv keys and values differ": (
            write(tmp_path / "b.st", {"keys/l": k4(1, 3, 2, 16), "values/l": k4(1, 4, 2, 16)}),
            "differ",
        ),
        "kv layer without values": (write(tmp_path / "c.st", {"keys/l": k4(1, 3, 2, 16)}), "differ"),
        "lora rank mismatch": (
            write(tmp_path / "d.st", {"down/m": k4(4, 8), "up/m": k4(6, 3)}, carrier="lora"),
            "down must be \\(r, in\\)",
        ),
        "int keys": (
            write(
                tmp_path / "e.st", {"keys/l": k4(1, 3, 2, 16, dtype=torch.int32), "values/l": k4(1, 3, 2, 16)}
            ),
            "'keys/l' is I32; field 'keys' of KVCache needs floating point",
        ),
        "int64 lora down": (
            write(
                tmp_path / "f.st", {"down/m": k4(4, 8, dtype=torch.int64), "up/m": k4(6, 4)}, carrier="lora"
            ),
            "is I64; field 'down' of LoraCache needs floating point",
        ),
        "bool lora up": (
            write(
                tmp_path / "g.st", {"down/m": k4(4, 8), "up/m": k4(6, 4, dtype=torch.bool)}, carrier="lora"
            ),
            "is BOOL",
        ),
        "nan keys": (
            write(tmp_path / "h.st", {"keys/l": k4(1, 3, 2, 16) * float("nan"), "values/l": k4(1, 3, 2, 16)}),
            "'keys/l' holds 96 NaN/Inf value",
        ),
        "inf in bf16 lora up": (
            write(
                tmp_path / "i.st",
                {"down/m": k4(4, 8), "up/m": torch.full((6, 4), float("inf"), dtype=torch.bfloat16)},
                carrier="lora",
            ),
            "holds 24 NaN/Inf",
        ),
        "tensor outside the layout": (
            write(tmp_path / "j.st", {"keys/l": k4(1, 3, 2, 16), "values/l": k4(1, 3, 2, 16), "evil": k4(1)}),
            "'evil' belongs to no tensor field",
        ),
        "layout names an unknown field": (
            write(
                tmp_path / "k.st",
                {"keys/l": k4(1, 1, 2, 16), "values/l": k4(1, 1, 2, 16)},
                layout={"keys": "dict", "values": "dict", "bogus": "tensor"},
            ),
            "has no tensor field 'bogus'",
        ),  # fmt: skip
        "unknown field in metadata": (
            write(
                tmp_path / "l.st",
                {"keys/l": k4(1, 1, 2, 16), "values/l": k4(1, 1, 2, 16)},
                fields={"template": None, "exec": "rm -rf /"},
            ),
            "not a valid KVCache: exec: Extra inputs are not permitted",
        ),  # fmt: skip
        "wrong format": (write(tmp_path / "m.st", {}, format=2), "cache format 2, expected 1"),
        "unknown carrier": (write(tmp_path / "n.st", {}, carrier="nosuch"), "no cache class .* 'nosuch'"),
        "carrier not a string": (write(tmp_path / "o.st", {}, carrier=["kv"]), "names no carrier"),
        "fields not an object": (write(tmp_path / "p.st", {}, fields=[1]), "'fields' must be an object"),
        "bad layout": (write(tmp_path / "q.st", {}, layout={"keys": "pickle"}), "'layout' must map"),
    }
    (tmp_path / "r.st").write_bytes(b"")
    cases["empty file"] = (tmp_path / "r.st", "truncated")
    save_file({"x": k4(2)}, str(tmp_path / "s.st"))
    cases["plain safetensors, no metadata"] = (tmp_path / "s.st", "not a Diffusion Templates cache")
    save_file({"x": k4(2)}, str(tmp_path / "t.st"), metadata={META: "{not json"})
    cases["metadata not JSON"] = (tmp_path / "t.st", "unreadable cache metadata")
    cases["a directory"] = (tmp_path, "unreadable cache file")
    cases["a missing file"] = (tmp_path / "missing.st", "unreadable cache file")
    for label, (path, match) in cases.items():
        with pytest.raises(CacheError, match=match):
            TemplateCache.load(path)
        assert label
    tally["files.malformed_rejected"] += len(cases)


def test_a_pickle_is_never_unpickled(tmp_path, tally):
    marker = tmp_path / "unpickled"
    path = tmp_path / "cache.safetensors"
    torch.save({"keys": _Unpickled(marker)}, path)
    with pytest.raises(CacheError, match="unreadable cache file"):
        TemplateCache.load(path)
    assert not marker.exists()
    tally["files.malformed_rejected"] += 1


class _Unpickled:
    """Pickles to a call that creates ``path``: shows whether a loader unpickled it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        import os

        return (os.mkdir, (str(self.path),))


def test_valid_caches_still_round_trip_bit_exactly(tmp_path):
    for cache in (kv_cache(), lora_cache()):
        path = tmp_path / f"{cache.carrier}.safetensors"
        cache.save(path)
        loaded = TemplateCache.load(path)
        assert type(loaded) is type(cache) and loaded.template == cache.template
        for name, tensor in cache.flat_tensors().items():
            assert torch.equal(loaded.flat_tensors()[name], tensor)


class IndexCache(TemplateCache):
    """A test-only cache with an integer field."""

    carrier: ClassVar[str] = "test-index"
    integer_fields: ClassVar[frozenset[str]] = frozenset({"ids"})

    ids: torch.Tensor
    weights: torch.Tensor


def test_integer_fields_are_declared_per_cache_class(tmp_path):
    path = tmp_path / "index.safetensors"
    IndexCache(ids=torch.arange(4), weights=torch.ones(4)).save(path)
    loaded = TemplateCache.load(path)
    assert loaded.ids.dtype == torch.int64 and torch.equal(loaded.ids, torch.arange(4))
    IndexCache(ids=torch.arange(4), weights=torch.arange(4)).save(path)
    with pytest.raises(CacheError, match="field 'weights' of IndexCache needs floating point"):
        TemplateCache.load(path)


# -- Template model weights ---------------------------------------------------------------------------------
class TinyModel(TemplateModel):
    @register_to_config
    def __init__(self, dim: int = 4):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)


def test_template_models_load_safetensors_only(tmp_path, tally):
    folder = tmp_path / "model"
    TinyModel().save_pretrained(folder)
    assert TinyModel.from_pretrained(folder).proj.weight.shape == (4, 4)

    with_code = tmp_path / "with-code"
    TinyModel().save_pretrained(with_code)
    executed = tmp_path / "executed"
    (with_code / "model.py").write_text(f"import pathlib\npathlib.Path({str(executed)!r}).touch()\n")
    with pytest.raises(TemplateError, match=r"refusing to load .* containing code \(model.py\)"):
        TinyModel.from_pretrained(with_code)
    assert not executed.exists()

    pickled = tmp_path / "pickled"
    TinyModel().save_pretrained(pickled)
    for path in pickled.glob("*.safetensors"):
        path.unlink()
    marker = tmp_path / "unpickled"
    state = dict(TinyModel().state_dict())
    state["marker"] = _Unpickled(marker)
    torch.save(state, pickled / "diffusion_pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        TinyModel.from_pretrained(pickled)
    assert not marker.exists()
    tally["files.malformed_rejected"] += 2


# -- no pickle anywhere in the host -------------------------------------------------------------------------
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}


def _unsafe_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) for every import of a pickling module, every ``torch.load`` not called with
    ``weights_only=True`` (also a bare reference, as in ``load = torch.load``) and every
    ``weights_only=False`` / ``allow_pickle=True`` / ``use_safetensors=False`` argument."""
    tree = ast.parse(source)
    found, allowed = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if ast.unparse(node.func) == "torch.load" and keywords.get("weights_only") == "True":
                allowed.add(id(node.func))
            for name, unsafe in (
                ("weights_only", "False"),
                ("allow_pickle", "True"),
                ("use_safetensors", "False"),
            ):
                if keywords.get(name) == unsafe:
                    found.append((node.lineno, f"{ast.unparse(node.func)}(..., {name}={unsafe})"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, f"import {a.name}")
                for a in node.names
                if a.name.split(".")[0] in UNSAFE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.split(".")[0] in UNSAFE_MODULES or (
                module == "torch" and "load" in {a.name for a in node.names}
            ):
                found.append((node.lineno, f"from {module} import ..."))
        elif (
            isinstance(node, ast.Attribute) and ast.unparse(node) == "torch.load" and id(node) not in allowed
        ):
            found.append((node.lineno, "torch.load without weights_only=True"))
    return sorted(found)


def test_the_host_source_never_unpickles(tally):
    root = Path(diffusion_templates.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) > 10
    offenders = [
        f"{path.relative_to(root)}:{line}: {what}"
        for path in files
        for line, what in _unsafe_uses(path.read_text())
    ]
    assert offenders == [], "unpickling code in the host:\n" + "\n".join(offenders)
    # the scan itself finds what it must
    sample = "import pickle\nx = torch.load(p)\ny = torch.load(p, weights_only=True)\n"
    sample += "z = np.load(p, allow_pickle=True)\n"
    assert _unsafe_uses(sample) == [
        (1, "import pickle"),
        (2, "torch.load without weights_only=True"),
        (4, "np.load(..., allow_pickle=True)"),
    ]
    tally["files.host_sources_scanned"] += len(files)
