"""The Template-cache store: hits, misses, what the key depends on, LRU by bytes, disk, threads."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import Field

from diffusion_templates import KVCache, LoraCache, Template, TemplateInputs, TemplatePipeline
from diffusion_templates.plugins import PluginHost
from diffusion_templates.store import (
    TemplateCacheStore,
    Uncacheable,
    backbone_identity,
    cache_key,
    caches_nbytes,
    canonical,
    inputs_digest,
    pipeline_weights,
)
from helpers import run


class GlowInputs(TemplateInputs):
    scale: float = Field(1.0, ge=0.0, le=4.0)
    length: int = 2
    image: Any = None


class CountingKV(Template):
    """Deterministic K/V from the scale; counts how often its model runs."""

    Inputs = GlowInputs
    carriers = ("kv",)

    def __init__(self):
        self.runs = 0

    def encode(self, inputs, context):
        self.runs += 1
        keys, values = {}, {}
        for name, layer in context.adapter.attention_layers().items():
            shape = (1, inputs.length, layer.heads, layer.head_dim)
            base = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
            keys[name] = torch.sin(base) * inputs.scale
            values[name] = torch.cos(base) * inputs.scale * (-1 if context.negative else 1)
        return KVCache(keys=keys, values=values)


def _host(version: str = "1.0", **attrs) -> tuple[PluginHost, CountingKV]:
    host = PluginHost()
    template = CountingKV()
    for name, value in attrs.items():
        setattr(template, name, value)
    host.register("template", "glow", template)
    host.info("template", "glow").version = version
    return host, template


def _entry(nbytes: int, value: float = 0.0) -> list[LoraCache]:
    n = nbytes // 4 // 2
    return [LoraCache(down={"m": torch.full((1, n), value)}, up={"m": torch.full((n, 1), value)})]


# ------------------------------------------------------------------------------ through the pipeline
def test_repeated_encode_is_a_hit_and_calls_are_unchanged(flux2_pipe):
    host, template = _host()
    tp = TemplatePipeline(flux2_pipe, plugins=host)
    assert isinstance(tp.store, TemplateCacheStore)
    spec = {"template": "glow", "scale": 0.5}
    first = tp.encode(spec)
    second = tp.encode({"template": "glow", "scale": 0.5, "length": 2})  # defaults spelled out: same key
    assert template.runs == 1
    assert tp.store.stats.misses == 1 and tp.store.stats.hits == 1
    assert second[0].template == "glow"
    for layer in first[0].keys:
        assert torch.equal(first[0].keys[layer], second[0].keys[layer])
    with_store = run(tp, "flux2_klein", templates=[spec])
    assert template.runs == 1  # the call reused the stored cache too
    uncached = TemplatePipeline(flux2_pipe, plugins=host, store=None)
    assert uncached.store is None
    assert torch.equal(run(uncached, "flux2_klein", templates=[spec]), with_store)
    assert template.runs == 2


def test_no_store_runs_the_model_every_time(flux2_pipe):
    host, template = _host()
    tp = TemplatePipeline(flux2_pipe, plugins=host, store=None)
    tp.encode("glow")
    tp.encode("glow")
    assert template.runs == 2


def test_inputs_version_branch_and_cache_version_change_the_key(flux2_pipe):
    host, template = _host()
    store = TemplateCacheStore()
    tp = TemplatePipeline(flux2_pipe, plugins=host, store=store)
    tp.encode({"template": "glow", "scale": 0.5})
    tp.encode({"template": "glow", "scale": 0.6})
    assert template.runs == 2
    negative = tp.encode({"template": "glow", "scale": 0.5}, negative=True)
    assert template.runs == 3  # the negative branch has its own entry (encode may see `negative`)
    assert torch.equal(negative[0].values["double_0"], -tp.encode("glow")[0].values["double_0"] * 0.5)
    host.info("template", "glow").version = "1.1"  # a new release of the template's distribution
    tp.encode({"template": "glow", "scale": 0.5})
    assert template.runs == 5
    template.cache_version = "2"
    tp.encode({"template": "glow", "scale": 0.5})
    assert template.runs == 6
    host.info("template", "glow").version = "1.0"  # back to the old version: its entry applies again
    del template.cache_version
    tp.encode({"template": "glow", "scale": 0.5})
    assert template.runs == 6


def test_entries_never_apply_to_another_backbone(flux2_pipe, flux_pipe):
    host, template = _host()
    store = TemplateCacheStore()
    a = TemplatePipeline(flux2_pipe, plugins=host, store=store)
    b = TemplatePipeline(flux_pipe, plugins=host, store=store)
    cache_a = a.encode("glow")[0]
    cache_b = b.encode("glow")[0]
    assert template.runs == 2
    assert set(cache_a.keys) == set(a.adapter.attention_layers())
    assert set(cache_b.keys) == set(b.adapter.attention_layers())
    assert len(store) == 2
    assert backbone_identity(a.adapter) != backbone_identity(b.adapter)


def test_backbone_identity_follows_config_and_dtype():
    class Denoiser(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.config = {"width": width}
            self.proj = torch.nn.Linear(2, 2)

    denoiser = Denoiser(4)
    adapter = SimpleNamespace(name="toy", denoiser=denoiser, dtype=torch.float32)
    base = backbone_identity(adapter)
    assert backbone_identity(adapter) == base
    assert backbone_identity(SimpleNamespace(name="toy", denoiser=Denoiser(4), dtype=torch.float32)) == base
    assert backbone_identity(SimpleNamespace(name="toy", denoiser=Denoiser(8), dtype=torch.float32)) != base
    assert backbone_identity(SimpleNamespace(name="other", denoiser=denoiser, dtype=torch.float32)) != base
    denoiser.to(torch.bfloat16)  # the dtype is read from the weights at every call
    assert backbone_identity(adapter)["dtype"] == "torch.bfloat16"
    denoiser.to(torch.float32)
    assert backbone_identity(adapter) == base
    denoiser.config = {"width": 5}  # diffusers replaces the frozen config object on change
    assert backbone_identity(adapter) != base
    # diffusers' bookkeeping entries (set-ordered lists, where the model came from) do not count
    for extra in (
        {"_use_default_values": ["a", "b"]},
        {"_use_default_values": ["b", "a"], "_name_or_path": "/elsewhere"},
        {"_diffusers_version": "0.1", "_class_name": "X"},
    ):
        denoiser.config = {"width": 4, **extra}
        assert backbone_identity(adapter) == base
    denoiser.config = {"width": 4, "mode": {"b", "a", "c"}}  # a set: hashed sorted, the same each time
    with_set = backbone_identity(adapter)
    denoiser.config = {"width": 4, "mode": {"c", "a", "b"}}
    assert backbone_identity(adapter) == with_set != base
    denoiser.config = {"width": 4}
    common = dict(template="glow", version="1", inputs=GlowInputs())
    keys = {
        cache_key(**common, backbone=base),
        cache_key(**common, backbone={**base, "dtype": "torch.bfloat16"}),
        cache_key(**common, backbone={**base, "config": "0" * 64}),
        cache_key(**common, backbone=base, negative=True),
        cache_key(template="glow", version="2", inputs=GlowInputs(), backbone=base),
        cache_key(template="shine", version="1", inputs=GlowInputs(), backbone=base),
        cache_key(template="glow", version="1", inputs=GlowInputs(scale=2.0), backbone=base),
    }
    assert len(keys) == 7


def test_key_is_the_hash_of_the_documented_record_and_the_fast_paths_agree(flux2_pipe):
    """``cache_key`` builds the record's JSON from cached parts and ``key_for`` remembers keys of
    scalar inputs: both must give exactly the SHA-256 of the whole record, and values that are
    equal in Python but not in JSON (``0.0``/``-0.0``, ``1``/``True``/``1.0``) must not share a key."""
    import hashlib
    import json

    from diffusion_templates import __version__
    from diffusion_templates.store import STORE_FORMAT

    class Mixed(TemplateInputs):
        a: Any = 0.0
        b: Any = None

    backbone = {"adapter": "toy", "denoiser": "x.Y", "config": "c" * 64, "dtype": "torch.float32"}

    def reference(inputs, **extra):
        record = {
            "store": STORE_FORMAT,
            "host": __version__,
            "template": "glow",
            "distribution": "dist",
            "version": "1",
            "cache_version": None,
            "inputs": canonical(inputs),
            "backbone": backbone,
            "negative": False,
            "weights": "",
            **extra,
        }
        text = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()

    values = [0.0, -0.0, 1, True, 1.0, "1", None, float("nan"), float("inf"), 2**70, "\x00"]
    for value in values:
        inputs = Mixed(a=value, b=[value])  # b: a list, so not the scalar fast path
        assert cache_key(
            template="glow", version="1", distribution="dist", inputs=inputs, backbone=backbone
        ) == reference(inputs)
    assert cache_key(
        template="glow",
        version="1",
        distribution="dist",
        inputs=Mixed(),
        backbone=backbone,
        negative=True,
        cache_version="2",
        weights="w" * 64,
    ) == reference(Mixed(), negative=True, cache_version="2", weights="w" * 64)

    host = PluginHost()
    host.register("template", "mixed", type("MixedTemplate", (CountingKV,), {"Inputs": Mixed}))
    tp = TemplatePipeline(flux2_pipe, plugins=host)
    klass = type(host.get("template", "mixed"))
    for _ in range(2):  # the second round comes from key_for's memo
        keys = [tp.store.key_for(tp, "mixed", Mixed(a=value)) for value in values]
        assert len(set(keys)) == len(values)
        slow = [
            cache_key(
                template="mixed",
                version="",
                distribution=f"{host.info('template', 'mixed').distribution}:"
                f"{klass.__module__}.{klass.__qualname__}",
                inputs=Mixed(a=value),
                backbone=backbone_identity(tp.adapter),
                weights=pipeline_weights(tp.pipe, tp.adapter.denoiser, None),  # no `reads`: every component
            )
            for value in values
        ]
        assert keys == slow


def test_arrays_are_hashed_by_content():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    same = canonical(t.clone())
    assert canonical(t) == same
    assert canonical(t.t().contiguous()) != same  # shape
    assert canonical(t.to(torch.float64)) != same  # dtype
    changed = t.clone()
    changed[1, 1] += 1e-6
    assert canonical(changed) != same
    assert canonical(torch.ones(2, dtype=torch.bfloat16)) == canonical(torch.ones(2, dtype=torch.bfloat16))
    a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert canonical(a) == canonical(a.copy()) and canonical(a) != canonical(a.T)
    image = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
    other = image.copy()
    other.putpixel((1, 1), (1, 0, 0))
    assert canonical(image) == canonical(image.copy()) and canonical(image) != canonical(other)
    assert inputs_digest(GlowInputs(image=image)) == inputs_digest(GlowInputs(image=image.copy()))
    assert inputs_digest(GlowInputs(image=image)) != inputs_digest(GlowInputs(image=other))
    assert inputs_digest(GlowInputs(image=t)) != inputs_digest(GlowInputs(image=t.numpy()))
    with pytest.raises(Uncacheable):
        canonical(object())
    with pytest.raises(Uncacheable):
        canonical(np.array([object()]))


def test_inputs_that_cannot_be_hashed_or_opted_out_templates_are_computed(flux2_pipe):
    host, template = _host()
    tp = TemplatePipeline(flux2_pipe, plugins=host)
    tp.encode({"template": "glow", "image": object()})
    tp.encode({"template": "glow", "image": object()})
    assert template.runs == 2 and tp.store.stats.uncacheable == 2 and len(tp.store) == 0
    image = Image.new("RGB", (4, 4))
    tp.encode({"template": "glow", "image": image})
    tp.encode({"template": "glow", "image": image.copy()})
    assert template.runs == 3
    host2, random_template = _host(cacheable=False)
    tp2 = TemplatePipeline(flux2_pipe, plugins=host2)
    tp2.encode("glow")
    tp2.encode("glow")
    assert random_template.runs == 2 and len(tp2.store) == 0


def test_failures_are_not_stored(flux2_pipe):
    host, template = _host()
    tp = TemplatePipeline(flux2_pipe, plugins=host)
    calls = []

    def boom():
        calls.append(1)
        raise RuntimeError("boom")

    key = tp.store.key_for(tp, "glow", GlowInputs())
    for _ in range(2):
        with pytest.raises(RuntimeError, match="boom"):
            tp.store.get_or_compute(key, boom)
    assert len(calls) == 2 and key not in tp.store


# ---------------------------------------------------------------------------------------- memory
def test_lru_eviction_by_bytes():
    size = caches_nbytes(_entry(4096))
    assert size == 4096
    store = TemplateCacheStore(max_bytes=3 * size)
    for key in "abc":
        store.put(key, _entry(4096))
    assert store.nbytes == 3 * size and store.keys() == ["a", "b", "c"]
    assert store.get("a") is not None  # a becomes the most recently used
    store.put("d", _entry(4096))
    assert store.keys() == ["c", "a", "d"] and store.stats.evictions == 1
    assert store.get("b") is None
    store.put("big", _entry(8192))  # needs two slots: the two least recently used go
    assert store.keys() == ["d", "big"] and store.nbytes == 3 * size
    store.put("huge", _entry(4 * size))  # over the whole budget: not kept in memory at all
    assert "huge" not in store and store.nbytes == 3 * size
    store.put("d", _entry(4096, 1.0))  # replacing an entry does not count it twice
    assert store.nbytes == 3 * size and float(store.get("d")[0].down["m"][0, 0]) == 1.0
    store.clear()
    assert len(store) == 0 and store.nbytes == 0


def test_shared_storage_and_nested_tensors_are_counted_once():
    t = torch.zeros(1, 256)
    cache = LoraCache(down={"a": t, "b": t}, up={"a": torch.zeros(8, 1), "b": torch.zeros(8, 1)})
    assert caches_nbytes([cache]) == 1024 + 2 * 32
    assert caches_nbytes([cache, cache]) == caches_nbytes([cache])


def test_returned_caches_do_not_alias_the_stored_containers():
    store = TemplateCacheStore()
    store.put("k", _entry(64, 2.0))
    got = store.get("k")[0]
    got.down["m"] = torch.zeros(1, 8)
    got.scaling["m"] = 9.0
    again = store.get("k")[0]
    assert float(again.down["m"][0, 0]) == 2.0 and again.scaling == {}


# ------------------------------------------------------------------------------------------ disk
def test_disk_round_trip_survives_a_new_store(tmp_path, flux2_pipe):
    host, template = _host()
    first = TemplatePipeline(flux2_pipe, plugins=host, store=TemplateCacheStore(disk_dir=tmp_path / "c"))
    cache = first.encode({"template": "glow", "scale": 0.3})[0]
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 1
    fresh = TemplateCacheStore(disk_dir=tmp_path / "c")  # another process, say
    second = TemplatePipeline(flux2_pipe, plugins=host, store=fresh)
    loaded = second.encode({"template": "glow", "scale": 0.3})[0]
    assert template.runs == 1 and fresh.stats.disk_hits == 1 and fresh.stats.misses == 0
    assert isinstance(loaded, KVCache) and loaded.template == "glow"
    for layer in cache.keys:
        assert torch.equal(loaded.keys[layer], cache.keys[layer])
        assert torch.equal(loaded.values[layer], cache.values[layer])
    second.encode({"template": "glow", "scale": 0.3})
    assert fresh.stats.hits == 1  # promoted to memory


def test_broken_disk_entries_are_misses_and_disk_is_bounded(tmp_path):
    store = TemplateCacheStore(disk_dir=tmp_path)
    store.put("k", _entry(64, 1.0))
    (tmp_path / "k-0.safetensors").write_bytes(b"garbage")
    fresh = TemplateCacheStore(disk_dir=tmp_path)
    assert fresh.get("k") is None and fresh.stats.disk_errors == 1
    # Not deleted (the store deletes only complete entries): computing the key again replaces it.
    got = fresh.get_or_compute("k", lambda: _entry(64, 2.0))
    assert float(got[0].down["m"][0, 0]) == 2.0 and fresh.stats.misses == 1
    again = TemplateCacheStore(disk_dir=tmp_path).get("k")
    assert again is not None and float(again[0].down["m"][0, 0]) == 2.0
    bounded = TemplateCacheStore(max_bytes=0, disk_dir=tmp_path / "b", disk_max_bytes=3000)
    for i, key in enumerate("abcd"):
        bounded.put(key, _entry(1024))
        time.sleep(0.01)
        if i == 1:
            bounded.get("a")  # touch: a is now more recent than b
    names = sorted(p.name for p in (tmp_path / "b").glob("*.json"))
    assert "b.json" not in names and "d.json" in names
    assert sum(p.stat().st_size for p in (tmp_path / "b").glob("*.safetensors")) <= 3000


def test_caches_that_cannot_be_saved_stay_in_memory(tmp_path):
    store = TemplateCacheStore(disk_dir=tmp_path)
    shared = torch.zeros(1, 2, 2, 16)
    cache = KVCache(keys={"double_0": shared}, values={"double_0": shared})  # one storage twice
    store.put("k", [cache])
    assert store.get("k") is not None
    assert not list(tmp_path.glob("*.json"))


# --------------------------------------------------------------------------------------- threads
def test_concurrent_misses_of_one_key_compute_once():
    store = TemplateCacheStore()
    calls = []
    barrier = threading.Barrier(8)

    def compute():
        calls.append(1)
        time.sleep(0.05)
        return _entry(256, 3.0)

    results = []

    def worker():
        barrier.wait()
        results.append(store.get_or_compute("k", compute))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 8
    assert all(float(r[0].down["m"][0, 0]) == 3.0 for r in results)
    assert store.stats.misses == 1 and store.stats.hits == 7


def test_many_threads_keep_the_byte_budget():
    size = caches_nbytes(_entry(1024))
    store = TemplateCacheStore(max_bytes=5 * size)
    errors = []

    def worker(seed):
        try:
            for i in range(200):
                key = str((seed * 7 + i) % 13)
                got = store.get_or_compute(key, lambda key=key: _entry(1024, float(key)))
                assert float(got[0].down["m"][0, 0]) == float(key)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.nbytes <= 5 * size and store.nbytes == len(store) * size
