"""Fuzzing: generated template specs and cache files end in a clean error or in success, nothing else.

* Template inputs: for every installed template (``PluginHost().names("template")``), hypothesis
  generates specs -- its real field names and random ones, plausible values and junk (wrong types,
  huge numbers, NaN/Inf, long strings, bytes, nested containers), unknown or non-string template
  names, specs that are not mappings -- and passes them to ``TemplatePipeline.resolve`` (validation
  only; no model runs). Allowed: success, ``TemplateInputError``, ``UnknownTemplateError``.
* Cache files: byte flips, truncations and header rewrites of valid saved kv/lora caches, and wholly
  random safetensors headers, through ``TemplateCache.load``. Allowed: a valid cache (finite
  floating tensors) or ``CacheError``.

Counts scale with ``DT_RELIABILITY_SCALE``; ``DT_FUZZ_RANDOM=1`` explores new cases on every run
instead of the derandomized default.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import rel_support
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from diffusion_templates import (
    CacheError,
    KVCache,
    LoraCache,
    TemplateCache,
    TemplateInputError,
    TemplatePipeline,
    UnknownTemplateError,
    UnsupportedError,
)
from diffusion_templates.plugins import PluginHost

INPUT_CASES = rel_support.scaled(600)
FILE_CASES = rel_support.scaled(600)


def _settings(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=os.environ.get("DT_FUZZ_RANDOM") != "1",
        suppress_health_check=list(HealthCheck),
    )


# -- values -------------------------------------------------------------------------------------------------
SPECIAL_NUMBERS = [
    math.nan,
    math.inf,
    -math.inf,
    1e308,
    -1e308,
    5e-324,
    -0.0,
    2**63,
    -(2**63) - 1,
    10**100,
    -(10**100),
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(),
    st.sampled_from(SPECIAL_NUMBERS),
    st.text(max_size=30),
    st.builds(lambda ch, n: ch * n, st.characters(), st.integers(1_000, 100_000)),  # long strings
    st.binary(max_size=20),
    st.complex_numbers(allow_nan=True),
)
junk = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.one_of(st.text(max_size=10), st.integers()), children, max_size=5),
        st.tuples(children, children),
        st.frozensets(st.integers(), max_size=3),
    ),
    max_leaves=6,
)


def _plausible(annotation: Any) -> st.SearchStrategy:
    """Values near what a field expects (so that validation also succeeds sometimes)."""
    text = repr(annotation)
    out = [junk]
    if "int" in text:
        out.append(st.integers(min_value=-5, max_value=5000))
    if "float" in text:
        out.append(st.floats(min_value=-10, max_value=10))
    if "str" in text:
        out.append(st.text(max_size=12))
    if "list" in text:
        out.append(st.lists(st.text(max_size=40), max_size=4))
    return st.one_of(out)


# -- template inputs ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tp(flux2_pipe) -> TemplatePipeline:
    return TemplatePipeline(flux2_pipe, plugins=PluginHost(), store=None)


def _fuzzable(tp: TemplatePipeline) -> dict[str, dict[str, Any]]:
    """Installed templates that load and run on this backbone, with their input fields."""
    out = {}
    for name in tp.plugins.names("template"):
        try:
            plugin = tp.plugins.get("template", name)
            tp._check_backbone(name, plugin)
        except (UnsupportedError, Exception):  # a broken or foreign plugin: not this test's subject
            continue
        out[name] = {field: info.annotation for field, info in plugin.Inputs.model_fields.items()}
    return out


def _spec_strategy(templates: dict[str, dict[str, Any]]) -> st.SearchStrategy:
    names = sorted(templates)

    @st.composite
    def spec(draw):
        kind = draw(st.integers(0, 19))
        if kind == 0:  # not a mapping at all
            return draw(st.one_of(st.text(max_size=20), junk, st.sampled_from(names)))
        if kind == 1:  # unknown or non-string template name
            name = draw(st.one_of(st.text(max_size=20), junk))
        else:
            name = draw(st.sampled_from(names))
        fields = templates.get(name, {}) if isinstance(name, str) else {}
        keys = (
            st.one_of(st.sampled_from(sorted(fields)), st.text(max_size=15))
            if fields
            else st.text(max_size=15)
        )
        values: dict[Any, Any] = {}
        for key in draw(st.lists(keys, max_size=4, unique=True)):
            values[key] = draw(_plausible(fields[key]) if key in fields else junk)
        if kind == 2:  # a non-string key
            values[draw(st.one_of(st.integers(), st.none(), st.tuples(st.integers())))] = draw(junk)
        if kind != 3:  # kind 3: the name is missing
            values["template"] = name
        return values

    return spec()


def test_fuzz_template_inputs_through_resolve(tp, tally):
    templates = _fuzzable(tp)
    assert {"test-kv", "test-lora", "test-flaky"} <= set(templates)
    outcomes: Counter = Counter()

    @_settings(INPUT_CASES)
    @given(spec=_spec_strategy(templates))
    def check(spec):
        try:
            resolved = tp.resolve(spec)
        except (TemplateInputError, UnknownTemplateError) as exc:
            message = str(exc)
            assert message and ("template" in message), message[:200]
            outcomes[type(exc).__name__] += 1
        else:
            assert isinstance(resolved.inputs, BaseModel) and resolved.name in templates
            outcomes["accepted"] += 1

    check()
    total = sum(outcomes.values())
    assert total >= INPUT_CASES * 0.9, outcomes
    assert outcomes["accepted"] and outcomes["TemplateInputError"] and outcomes["UnknownTemplateError"], (
        outcomes
    )
    tally["fuzz.inputs"] += total
    tally["fuzz.templates"] += len(templates)
    for key, value in outcomes.items():
        tally[f"fuzz.inputs.{key}"] += value


# -- cache files --------------------------------------------------------------------------------------------
def _valid_files() -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    caches = [
        KVCache(
            keys={
                "double_0": torch.randn(1, 3, 2, 4, generator=g),
                "single_1": torch.randn(1, 2, 2, 4, generator=g),
            },
            values={
                "double_0": torch.randn(1, 3, 2, 4, generator=g),
                "single_1": torch.randn(1, 2, 2, 4, generator=g),
            },
            template="fuzz",
        ),
        LoraCache(
            down={"a.to_q": torch.randn(2, 8, generator=g).half()},
            up={"a.to_q": torch.randn(6, 2, generator=g).half()},
            scaling={"a.to_q": 0.5},
        ),
    ]
    out = []
    for i, cache in enumerate(caches):
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"dt-fuzz-valid-{os.getpid()}-{i}.safetensors"
        cache.save(path)
        out.append(path.read_bytes())
        path.unlink()
    return out


VALID = _valid_files()
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "U32", "C64", "F8_E4M3", "xx", ""]
json_junk = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=12),
    ),
    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)),
    max_leaves=8,
)
sizes = st.one_of(
    st.integers(0, 64), st.sampled_from([10**6, 2**31, 2**40, 10**12, 2**64 - 1]), st.integers(-3, -1)
)


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _pack(header: Any, data: bytes, lie: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if lie is None else lie % 2**64) + text + data


@st.composite
def mutated_file(draw) -> bytes:
    raw = bytearray(draw(st.sampled_from(VALID)))
    kind = draw(st.integers(0, 5))
    if kind == 0:  # flip bytes anywhere
        for _ in range(draw(st.integers(1, 8))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        return bytes(raw)
    if kind == 1:  # truncate
        return bytes(raw[: draw(st.integers(0, len(raw) - 1))])
    if kind == 2:  # flip bytes in the data only (values change, maybe to NaN/Inf)
        header, data = _split(bytes(raw))
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.sampled_from([0x7F, 0xFF, 0x80, 0x00, 0xC0]))
        return _pack(header, bytes(data))
    header, data = _split(bytes(raw))
    if kind == 3:  # rewrite one field of one tensor entry
        name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
        value = draw(
            st.one_of(
                json_junk,
                st.sampled_from(DTYPES),
                st.lists(sizes, max_size=5),
                st.tuples(sizes, sizes).map(list),
            )
        )
        header[name][field] = value
    elif kind == 4:  # rewrite the cache metadata
        meta = json.loads(header["__metadata__"]["diffusion_templates.cache"])
        key = draw(st.sampled_from(["format", "carrier", "fields", "layout", "junk"]))
        meta[key] = draw(
            st.one_of(
                json_junk,
                st.sampled_from(["kv", "lora", "nosuch", 1, 2]),
                st.dictionaries(st.text(max_size=8), json_junk),
            )
        )
        header["__metadata__"]["diffusion_templates.cache"] = draw(
            st.one_of(st.just(json.dumps(meta)), st.text(max_size=30))
        )
    else:  # add, drop or rename a tensor entry
        op = draw(st.integers(0, 2))
        names = sorted(k for k in header if k != "__metadata__")
        if op == 0:
            header[draw(st.text(max_size=12))] = draw(json_junk)
        elif op == 1:
            header.pop(draw(st.sampled_from(names)))
        else:
            header[draw(st.text(max_size=12))] = header.pop(draw(st.sampled_from(names)))
    lie = draw(st.one_of(st.none(), st.none(), sizes))
    return _pack(header, data, lie)


@st.composite
def random_file(draw) -> bytes:
    entries = {}
    for name in draw(st.lists(st.text(max_size=12), max_size=4, unique=True)):
        entries[name] = {
            "dtype": draw(st.sampled_from(DTYPES)),
            "shape": draw(st.lists(sizes, max_size=4)),
            "data_offsets": draw(st.tuples(sizes, sizes).map(list)),
        }
    meta = {"format": 1, "carrier": draw(st.sampled_from(["kv", "lora", "x"])), "fields": {}, "layout": {}}
    if draw(st.booleans()):
        entries["__metadata__"] = {"diffusion_templates.cache": json.dumps(meta)}
    data = draw(st.binary(max_size=256))
    return _pack(entries, data, draw(st.one_of(st.none(), sizes)))


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_fuzz_cache_files_through_load(fuzz_dir, tally):
    path = fuzz_dir / "case.safetensors"
    outcomes: Counter = Counter()

    @_settings(FILE_CASES)
    @given(
        raw=st.one_of(mutated_file(), mutated_file(), random_file()),
        cls=st.sampled_from([TemplateCache, KVCache]),
    )
    def check(raw, cls):
        path.write_bytes(raw)
        try:
            cache = cls.load(path)
        except CacheError as exc:
            assert str(path) in str(exc)
            outcomes["rejected"] += 1
        else:
            assert isinstance(cache, cls)
            for tensor in cache.flat_tensors().values():
                assert tensor.is_floating_point() and bool(torch.isfinite(tensor).all())
            outcomes["accepted"] += 1

    check()
    total = sum(outcomes.values())
    assert total >= FILE_CASES * 0.9 and outcomes["rejected"] and outcomes["accepted"], outcomes
    tally["fuzz.cache_files"] += total
    tally["fuzz.cache_files.rejected"] += outcomes["rejected"]
    tally["fuzz.cache_files.accepted"] += outcomes["accepted"]
