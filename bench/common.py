"""Shared pieces of the benchmarks (CPU: run.py, GPU: gpu.py).

Everything is built from configs with random weights; nothing is downloaded. Plugins are
registered in code on a private :class:`PluginHost` (no entry points needed, so this also works
from a plain ``PYTHONPATH`` on the GPU machine).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from pydantic import Field

from diffusion_templates import KVCache, LoraCache, Template, TemplateInputs
from diffusion_templates.backbones.flux2 import Flux2Adapter
from diffusion_templates.carriers.kv import KVCarrier
from diffusion_templates.carriers.lora import LoraCarrier
from diffusion_templates.models import TemplateModelLoader
from diffusion_templates.plugins import PluginHost
from diffusion_templates.template import TemplateModel

# ------------------------------------------------------------------------------------------ timing


def sync(device: torch.device | str | None = None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    after: Callable[[], None] | None = None,
    contexts: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in rounds (one call of each per round, the order
    rotating), so that drifts of a busy machine hit every variant alike. ``contexts[name]()`` gives a
    context manager entered before and left after that variant's call, outside the timing (e.g. a
    LoRA loaded or fused for that call only)."""
    names = list(fns)
    contexts = contexts or {}

    def once(name: str) -> float:
        with contexts[name]() if name in contexts else contextlib.nullcontext():
            start = time.perf_counter()
            fns[name]()
            if after is not None:
                after()
            return time.perf_counter() - start

    for _ in range(warmup):
        for name in names:
            once(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(once(name))
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a/b (robust to drifts that hit both of one round)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


# ----------------------------------------------------------------------------------------- plugins
class KVInputs(TemplateInputs):
    length: int = Field(64, ge=0, le=16384)
    seed: int = 0


class RandomKV(Template):
    """Seeded random K/V of ``length`` tokens for every attention layer (a stand-in template)."""

    Inputs = KVInputs
    carriers = ("kv",)

    def encode(self, inputs: KVInputs, context) -> KVCache:
        return random_kv(context.adapter, inputs.length, inputs.seed)


def random_kv(adapter, length: int, seed: int) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    keys, values = {}, {}
    for name, layer in adapter.attention_layers().items():
        shape = (1, length, layer.heads, layer.head_dim)
        keys[name] = torch.randn(shape, generator=g).to(adapter.device, adapter.dtype)
        values[name] = torch.randn(shape, generator=g).to(adapter.device, adapter.dtype)
    return KVCache(keys=keys, values=values)


def sinusoidal(x: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    angles = x.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class BrightnessModel(TemplateModel):
    """The paper's brightness-style kv Template model: per attention layer, a scalar ->
    sinusoidal embedding -> Linear -> SiLU -> Linear -> ``tokens`` key and value tokens, plus a
    learned positional embedding; keys and values shaped (B, tokens, heads, head_dim)."""

    @register_to_config
    def __init__(
        self,
        layer_names: tuple[str, ...] = ("double_0",),
        heads: int = 2,
        head_dim: int = 16,
        tokens: int = 16,
        embed_dim: int = 256,
        hidden_dim: int = 256,
    ):
        super().__init__()
        width = heads * head_dim

        def mlp() -> torch.nn.Sequential:
            return torch.nn.Sequential(
                torch.nn.Linear(embed_dim, hidden_dim),
                torch.nn.SiLU(),
                torch.nn.Linear(hidden_dim, tokens * width),
            )

        self.key_mlps = torch.nn.ModuleDict({n: mlp() for n in layer_names})
        self.value_mlps = torch.nn.ModuleDict({n: mlp() for n in layer_names})
        self.positions = torch.nn.ParameterDict(
            {n: torch.nn.Parameter(torch.randn(tokens, width) * 0.02) for n in layer_names}
        )

    def forward(self, scale: float | torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        param = self.positions[next(iter(self.positions))]
        scale = torch.as_tensor(scale, device=param.device).reshape(-1)
        emb = sinusoidal(scale, self.config.embed_dim).to(param.dtype)
        shape = (scale.shape[0], self.config.tokens, self.config.heads, self.config.head_dim)
        keys, values = {}, {}
        for name in self.key_mlps:
            pos = self.positions[name][None]
            keys[name] = (
                self.key_mlps[name](emb).reshape(scale.shape[0], self.config.tokens, -1) + pos
            ).reshape(shape)
            values[name] = (
                self.value_mlps[name](emb).reshape(scale.shape[0], self.config.tokens, -1) + pos
            ).reshape(shape)
        return keys, values


class BrightnessInputs(TemplateInputs):
    scale: float = Field(0.5, ge=-10.0, le=10.0)


class Brightness(Template):
    """A kv template running a :class:`BrightnessModel` loaded through a :class:`TemplateModelLoader`."""

    Inputs = BrightnessInputs
    carriers = ("kv",)

    def __init__(self, folder, loader: TemplateModelLoader, eager: bool = False):
        self.folder, self.loader = folder, loader
        self.model = None
        if eager:  # the reference without lazy loading: every model is loaded (and moved) up front
            self.model = BrightnessModel.from_pretrained(folder)
            with torch.no_grad():  # safetensors weights are mmapped: read them, as a move to the GPU would
                for param in self.model.parameters():
                    param.sum()

    def encode(self, inputs: BrightnessInputs, context) -> KVCache:
        model = self.model
        if model is None:
            model = self.loader.load(BrightnessModel, self.folder, device=context.device, dtype=context.dtype)
        else:
            param = next(model.parameters())
            if (param.dtype, param.device) != (context.dtype, context.device):
                model.to(context.device, context.dtype)
        keys, values = model.encode(inputs)
        return KVCache(keys=keys, values=values)


def brightness_model(adapter, tokens: int = 16, hidden_dim: int = 256, seed: int = 0) -> BrightnessModel:
    layers = adapter.attention_layers()
    first = next(iter(layers.values()))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BrightnessModel(
            layer_names=tuple(layers),
            heads=first.heads,
            head_dim=first.head_dim,
            tokens=tokens,
            hidden_dim=hidden_dim,
        )


def make_host(templates: dict[str, Any] | None = None) -> PluginHost:
    """A plugin host with the kv and lora carriers, the flux2 adapter and ``templates`` (all in code)."""
    host = PluginHost(infos=[])
    host.register("carrier", "kv", KVCarrier)
    host.register("carrier", "lora", LoraCarrier)
    host.register("backbone", "flux2", Flux2Adapter)
    for name, template in (templates or {}).items():
        host.register("template", name, template)
    return host


# ------------------------------------------------------------------------------ FLUX.2 transformers
#: FLUX.2 [klein] 4B transformer (black-forest-labs/FLUX.2-klein-4B, transformer/config.json).
KLEIN_4B = dict(
    patch_size=1,
    in_channels=128,
    num_layers=5,
    num_single_layers=20,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=7680,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)

#: A medium FLUX.2 transformer (~32M parameters): a 256x256 step takes ~0.5 s on one busy CPU core.
MEDIUM = dict(
    patch_size=1,
    in_channels=16,  # the tiny VAE's 4 latent channels, packed 2x2
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=64,
    num_attention_heads=8,
    joint_attention_dim=32,  # the tiny Qwen3 text encoder: hidden 16 x 2 output layers
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(16, 16, 16, 16),
    guidance_embeds=False,
)

#: A small stand-in for KLEIN_4B (same structure) for checking gpu.py on a CPU.
KLEIN_TINY = dict(KLEIN_4B, num_layers=2, num_single_layers=2, num_attention_heads=2, joint_attention_dim=64)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class TransformerLoop:
    """A pipeline-shaped stand-in for the GPU rows: a ``transformer`` attribute (so the flux2 adapter
    matches) and a call that runs ``steps`` Euler steps of the transformer on fixed random inputs,
    under ``cache_context("cond")`` as Flux2KleinPipeline does."""

    def __init__(self, transformer, image_tokens: int, text_tokens: int, batch: int = 1, seed: int = 0):
        self.transformer = transformer
        param = next(transformer.parameters())
        self.device, self.dtype = param.device, param.dtype
        config = transformer.config
        g = torch.Generator().manual_seed(seed)
        side = int(math.isqrt(image_tokens))
        assert side * side == image_tokens, "image_tokens must be a square grid"

        def rand(*shape):
            return torch.randn(*shape, generator=g).to(self.device, self.dtype)

        self.latents = rand(batch, image_tokens, config.in_channels)
        self.text = rand(batch, text_tokens, config.joint_attention_dim)
        t, h, w, ln = torch.arange(1), torch.arange(side), torch.arange(side), torch.arange(1)
        self.img_ids = torch.cartesian_prod(t, h, w, ln)[None].expand(batch, -1, -1).to(self.device)
        text_ids = torch.cartesian_prod(
            torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text_tokens)
        )
        self.txt_ids = text_ids[None].expand(batch, -1, -1).to(self.device)

    @torch.no_grad()
    def __call__(self, steps: int = 1) -> torch.Tensor:
        x = self.latents
        with self.transformer.cache_context("cond"):
            for i in range(steps):
                t = torch.full((x.shape[0],), 1.0 - i / steps, device=self.device, dtype=self.dtype)
                v = self.transformer(
                    hidden_states=x,
                    encoder_hidden_states=self.text,
                    timestep=t,
                    img_ids=self.img_ids,
                    txt_ids=self.txt_ids,
                    return_dict=False,
                )[0]
                x = x - v / steps
        sync(self.device)
        return x


# ---------------------------------------------------------------------------- hand-written kv patch
@contextlib.contextmanager
def hand_written_kv(transformer: torch.nn.Module, cache: KVCache) -> Iterator[None]:
    """The baseline for the kv carrier: the least machinery that does the same concatenation.

    A forward pre-hook on each attention module records its extra K/V; the ``dispatch_attention_fn``
    that diffusers' FLUX.2 processors call (imported into transformer_flux2) is replaced by one that
    concatenates them after the RoPE'd keys/values and calls the original.
    """
    import diffusers.models.transformers.transformer_flux2 as tf2

    layers = {}
    for i, block in enumerate(transformer.transformer_blocks):
        layers[f"double_{i}"] = block.attn
    for i, block in enumerate(transformer.single_transformer_blocks):
        layers[f"single_{i}"] = block.attn
    extra = {}
    for name, k in cache.keys.items():
        param = next(layers[name].parameters())
        extra[layers[name]] = (
            k.to(param.device, param.dtype),
            cache.values[name].to(param.device, param.dtype),
        )
    current: list[Any] = [None]
    original = tf2.dispatch_attention_fn

    def dispatch(query, key, value, *args, **kwargs):
        kv = current[0]
        if kv is not None:
            k, v = kv
            key = torch.cat([key, k.expand(key.shape[0], -1, -1, -1)], dim=1)
            value = torch.cat([value, v.expand(value.shape[0], -1, -1, -1)], dim=1)
            mask = kwargs.get("attn_mask")
            if mask is not None:
                kwargs["attn_mask"] = torch.nn.functional.pad(mask, (0, k.shape[1]), value=True)
        return original(query, key, value, *args, **kwargs)

    handles = []
    for module, kv in extra.items():
        handles.append(module.register_forward_pre_hook(lambda m, a, kv=kv: current.__setitem__(0, kv)))
        handles.append(module.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))
    tf2.dispatch_attention_fn = dispatch
    try:
        yield
    finally:
        tf2.dispatch_attention_fn = original
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------- LoRA
def attention_linears(transformer: torch.nn.Module) -> list[str]:
    """Every Linear inside the attention modules (the usual LoRA targets)."""
    out = []
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and ".attn." in f".{name}":
            out.append(name)
    return out


def random_loras(transformer, targets: list[str], count: int, rank: int, seed: int = 0) -> list[LoraCache]:
    """``count`` LoRAs of ``rank`` on ``targets`` (float32 factors, each scaled 1/count)."""
    g = torch.Generator().manual_seed(seed)
    loras = []
    for i in range(count):
        down, up = {}, {}
        for path in targets:
            module = transformer.get_submodule(path)
            down[path] = torch.randn(rank, module.in_features, generator=g) / module.in_features**0.5
            up[path] = torch.randn(module.out_features, rank, generator=g) * 0.01
        loras.append(
            LoraCache(down=down, up=up, scaling={p: 1.0 / count for p in targets}, template=f"lora{i}")
        )
    return loras


class PeftCycle:
    """diffusers' own LoRA switching: ``load_lora_weights`` per LoRA, ``set_adapters``, then
    ``unload_lora_weights`` (on a pipeline), or the transformer's ``load_lora_adapter`` /
    ``set_adapters`` / ``unload_lora`` (on a bare transformer)."""

    def __init__(self, target: Any, loras: list[LoraCache]):
        self.target = target
        self.state_dicts = [lora.to_state_dict(prefix="transformer") for lora in loras]
        self.names = [f"bench{i}" for i in range(len(loras))]

    def load(self) -> None:
        target = self.target
        for name, sd in zip(self.names, self.state_dicts, strict=True):
            if hasattr(target, "load_lora_weights"):
                target.load_lora_weights(dict(sd), adapter_name=name)
            else:
                target.transformer.load_lora_adapter(dict(sd), adapter_name=name, prefix="transformer")
        setter = target if hasattr(target, "set_adapters") else target.transformer
        setter.set_adapters(self.names, [1.0] * len(self.names))

    def unload(self) -> None:
        if hasattr(self.target, "unload_lora_weights"):
            self.target.unload_lora_weights()
        else:
            self.target.transformer.unload_lora()

    @contextlib.contextmanager
    def loaded(self) -> Iterator[None]:
        self.load()
        try:
            yield
        finally:
            self.unload()


@contextlib.contextmanager
def fused_lora(transformer: torch.nn.Module, lora: LoraCache) -> Iterator[None]:
    """The weights with ``lora`` (a merged cache) added in place, restored from a backup copy on exit:
    the host's own fusion code (``TemplatePipeline(lora_fusion=...)``), so the row measures it."""
    from diffusion_templates.carriers.lora import fuse_into_weights, restore_weights

    modules = []
    for path in lora.down:
        module = transformer.get_submodule(path)
        cast = {"device": module.weight.device, "dtype": module.weight.dtype}
        modules.append((module, lora.down[path].to(**cast), lora.up[path].to(**cast), lora.scale_of(path)))
    backups = fuse_into_weights(modules)
    try:
        yield
    finally:
        restore_weights(backups)
