"""Template caches save to one safetensors file and load back bit-exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from diffusion_templates import CacheError, KVCache, LoraCache, TemplateCache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kv_cache_round_trip_is_bit_exact(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    cache = KVCache(
        keys={
            "double_0": torch.randn(1, 3, 2, 16, generator=g).to(dtype),
            "single_1": torch.randn(2, 5, 2, 16, generator=g).to(dtype),
        },
        values={
            "double_0": torch.randn(1, 3, 2, 16, generator=g).to(dtype),
            "single_1": torch.randn(2, 5, 2, 16, generator=g).to(dtype),
        },
        template="glow",
    )
    path = tmp_path / "kv.safetensors"
    cache.save(path)
    loaded = TemplateCache.load(path)
    assert isinstance(loaded, KVCache) and loaded.template == "glow"
    for layer in cache.keys:
        assert loaded.keys[layer].dtype == dtype
        assert torch.equal(loaded.keys[layer], cache.keys[layer])
        assert torch.equal(loaded.values[layer], cache.values[layer])


def test_lora_cache_round_trip_keeps_scaling(tmp_path):
    g = torch.Generator().manual_seed(1)
    cache = LoraCache(
        down={"a.to_q": torch.randn(4, 8, generator=g)},
        up={"a.to_q": torch.randn(6, 4, generator=g)},
        scaling={"a.to_q": 0.25},
    )
    cache.save(tmp_path / "l.safetensors")
    loaded = LoraCache.load(tmp_path / "l.safetensors")
    assert loaded.scaling == {"a.to_q": 0.25}
    assert torch.equal(loaded.down["a.to_q"], cache.down["a.to_q"])
    assert torch.equal(loaded.up["a.to_q"], cache.up["a.to_q"])
    with safe_open(tmp_path / "l.safetensors", framework="pt") as f:
        meta = json.loads(f.metadata()["diffusion_templates.cache"])
    assert meta["carrier"] == "lora" and meta["fields"]["scaling"] == {"a.to_q": 0.25}


def test_loading_the_wrong_kind_or_garbage_is_a_clear_error(tmp_path):
    cache = LoraCache(down={"m": torch.ones(1, 2)}, up={"m": torch.ones(3, 1)})
    cache.save(tmp_path / "l.safetensors")
    with pytest.raises(CacheError, match="holds a 'lora' cache, not 'kv'"):
        KVCache.load(tmp_path / "l.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CacheError, match="unreadable"):
        TemplateCache.load(tmp_path / "junk.safetensors")
