"""Merge rules of the kv and lora carriers, against expectations computed by hand."""

from __future__ import annotations

import pytest
import torch

from diffusion_templates import CarrierConflictError, KVCache, LoraCache
from diffusion_templates.carriers.kv import KVCarrier
from diffusion_templates.carriers.lora import LoraCarrier


def kv(layers: dict[str, float], length: int = 2, heads: int = 2, head_dim: int = 4, template: str = "t"):
    keys = {n: torch.full((1, length, heads, head_dim), v) for n, v in layers.items()}
    values = {n: torch.full((1, length, heads, head_dim), -v) for n, v in layers.items()}
    return KVCache(keys=keys, values=values, template=template)


def test_kv_merge_concatenates_per_layer_and_keeps_partial_layers():
    a = kv({"double_0": 1.0, "single_0": 2.0}, length=2, template="a")
    b = kv({"double_0": 3.0, "double_1": 4.0}, length=3, template="b")
    merged = KVCarrier().merge_caches([a, b])
    assert merged.template == "a+b"
    assert sorted(merged.keys) == ["double_0", "double_1", "single_0"]
    # double_0: a's two tokens, then b's three, in template order.
    assert merged.keys["double_0"][0, :, 0, 0].tolist() == [1.0, 1.0, 3.0, 3.0, 3.0]
    assert merged.values["double_0"][0, :, 0, 0].tolist() == [-1.0, -1.0, -3.0, -3.0, -3.0]
    assert torch.equal(merged.keys["single_0"], a.keys["single_0"])
    assert torch.equal(merged.keys["double_1"], b.keys["double_1"])


def test_kv_merge_broadcasts_batch_one_and_refuses_conflicts():
    a = kv({"double_0": 1.0})
    b = KVCache(keys={"double_0": torch.ones(3, 1, 2, 4)}, values={"double_0": torch.ones(3, 1, 2, 4)})
    assert KVCarrier().merge_caches([a, b]).keys["double_0"].shape == (3, 3, 2, 4)
    with pytest.raises(CarrierConflictError, match="double_0"):
        KVCarrier().merge_caches([a, kv({"double_0": 1.0}, head_dim=8)])
    c = KVCache(keys={"double_0": torch.ones(2, 1, 2, 4)}, values={"double_0": torch.ones(2, 1, 2, 4)})
    with pytest.raises(CarrierConflictError, match="batch sizes"):
        KVCarrier().merge_caches([b, c])


def test_kv_cache_validates_shapes():
    with pytest.raises(ValueError, match="keys and values must be"):
        KVCache(keys={"x": torch.ones(2, 3)}, values={"x": torch.ones(2, 3)})
    with pytest.raises(ValueError, match="differ"):
        KVCache(keys={"x": torch.ones(1, 2, 2, 4)}, values={"x": torch.ones(1, 3, 2, 4)})
    with pytest.raises(ValueError, match="layers with keys"):
        KVCache(keys={"x": torch.ones(1, 2, 2, 4)}, values={})


def lora(modules: dict[str, tuple[int, int, int, float]], seed: int, template: str = "t") -> LoraCache:
    g = torch.Generator().manual_seed(seed)
    down = {m: torch.randn(r, i, generator=g) for m, (r, i, o, s) in modules.items()}
    up = {m: torch.randn(o, r, generator=g) for m, (r, i, o, s) in modules.items()}
    return LoraCache(
        down=down, up=up, scaling={m: s for m, (r, i, o, s) in modules.items()}, template=template
    )


def test_lora_merge_is_the_exact_sum_of_scaled_deltas_on_any_module_sets():
    a = lora({"q": (2, 6, 5, 0.5), "k": (3, 6, 5, 1.0)}, seed=0, template="a")
    b = lora({"q": (4, 6, 5, 2.0), "v": (1, 6, 7, -1.0)}, seed=1, template="b")
    merged = LoraCarrier().merge_caches([a, b])
    assert sorted(merged.down) == ["k", "q", "v"]
    # Overlap: ranks concatenated (2 + 4), delta = 0.5 B_a A_a + 2.0 B_b A_b.
    assert merged.down["q"].shape == (6, 6) and merged.up["q"].shape == (5, 6)
    expected_q = 0.5 * a.up["q"] @ a.down["q"] + 2.0 * b.up["q"] @ b.down["q"]
    torch.testing.assert_close(merged.delta("q"), expected_q, rtol=0, atol=1e-5)
    # Modules in one LoRA only keep their factors and scaling untouched (the reference keeps only
    # the first LoRA's keys; here every module of every LoRA survives).
    assert merged.down["k"] is a.down["k"] and merged.scale_of("k") == 1.0
    assert merged.up["v"] is b.up["v"] and merged.scale_of("v") == -1.0
    torch.testing.assert_close(merged.delta("v"), -(b.up["v"] @ b.down["v"]))


def test_lora_merge_refuses_mismatched_features():
    a = lora({"q": (2, 6, 5, 1.0)}, seed=0)
    b = lora({"q": (2, 8, 5, 1.0)}, seed=1)
    with pytest.raises(CarrierConflictError, match="'q'"):
        LoraCarrier().merge_caches([a, b])


def test_lora_state_dict_round_trip_with_alpha():
    a = lora({"transformer_blocks.0.attn.to_q": (4, 6, 5, 1.0)}, seed=3)
    sd = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a.down["transformer_blocks.0.attn.to_q"],
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": a.up["transformer_blocks.0.attn.to_q"],
        "transformer.transformer_blocks.0.attn.to_q.alpha": torch.tensor(2.0),
    }
    cache = LoraCache.from_state_dict(sd, scale=3.0)
    assert cache.scale_of("transformer_blocks.0.attn.to_q") == pytest.approx(3.0 * 2.0 / 4)
    back = LoraCache.from_state_dict(cache.to_state_dict())
    torch.testing.assert_close(
        back.delta("transformer_blocks.0.attn.to_q"), cache.delta("transformer_blocks.0.attn.to_q")
    )
