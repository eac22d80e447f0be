"""The ``tiled_denoise`` carrier: every denoiser call of a generation runs on overlapping tiles.

**What it carries.** A :class:`TiledDenoiseCache`: ``tile_size`` and ``tile_overlap`` in pixels
(``tile_size`` 0: no tiling), and optionally the call's target ``height``/``width`` and a default
``prompt`` (the superres template fills both in).

**How it is injected.** MultiDiffusion (Bar-Tal et al. 2023) inside one pipeline call: each time
the pipeline calls its denoiser on the full latents, the call is split into overlapping tiles of the
latent grid; the denoiser runs on each tile with the same prompt, timestep and guidance (each tile
looks like a standalone image of the tile size: FLUX position ids and Qwen-Image ``img_shapes`` are
those of the tile, SD3 centre-crops its position embedding as for any size), and the tile
predictions are averaged per latent cell with feathered weights (a raised-cosine ramp over the
overlap, 1 in the interior and along the image border). The scheduler then steps on the blended
prediction, so every tile starts each step from the same, already blended latents: overlaps agree
and no seam can form, unlike denoising tiles separately and blending the results once.

The split sits *innermost* in the denoiser's diffusers hook chain, directly around the model's own
``forward``. Everything outside it (the host's CFG branch tracker, the ``guidance`` carrier, the
``residual`` carrier's ControlNet residuals, the user's hooks) sees one full-size call and one
full-size prediction; the ``kv`` and ``lora`` carriers act on attention and Linear modules inside
the model and so apply to every tile. ControlNet residuals passed to the denoiser are cropped with
the tile (FLUX.1/Qwen-Image/SD3 token residuals, SDXL feature maps at each resolution).

Host mechanisms do not offer an innermost position (``HookRegistry.register_hook`` always wraps
the outermost function), so :class:`InnermostForward` replaces the innermost function reference of
the denoiser's registry for the duration of the call and puts it back exactly; with no registry it
registers a normal hook (then it is innermost by definition). A host API for this is proposed in
the package README.

Also, in ``update_call_kwargs``: the cache's ``height``/``width`` are set when the call gives none
(a different size in the call is an error naming the template), and its ``prompt`` when the call
has neither ``prompt`` nor ``prompt_embeds``.

**Merge rule.** One tiling per call: equal caches merge into one, different ones are a
:class:`CarrierConflictError`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.hooks import HookRegistry, ModelHook
from pydantic import Field, model_validator

from diffusion_templates import CacheError, Carrier, CarrierConflictError, TemplateCache, UnsupportedError
from diffusion_templates.context import InjectionTarget
from diffusion_templates.injection import HookSet, Injection, unique_hook_name

CARRIER = "tiled_denoise"


class TiledDenoiseCache(TemplateCache):
    carrier: ClassVar[str] = CARRIER

    tile_size: int = Field(0, ge=0, le=16384, description="tile side in pixels; 0 = no tiling")
    tile_overlap: int = Field(0, ge=0, le=16384, description="overlap of neighbouring tiles, pixels")
    height: int | None = Field(None, ge=1, le=16384, description="the call's height, pixels")
    width: int | None = Field(None, ge=1, le=16384, description="the call's width, pixels")
    prompt: str | None = Field(None, description="prompt used when the call gives none")

    @model_validator(mode="after")
    def _check(self) -> TiledDenoiseCache:
        if self.tile_size and self.tile_overlap >= self.tile_size:
            raise ValueError(
                f"tiled_denoise cache: tile_overlap {self.tile_overlap} must be smaller than tile_size "
                f"{self.tile_size}"
            )
        if (self.height is None) != (self.width is None):
            raise ValueError("tiled_denoise cache: give both height and width, or neither")
        return self

    def settings(self) -> dict[str, Any]:
        return self.model_dump(exclude={"template"})


# --------------------------------------------------------------------------- tile layout


def spans(length: int, tile: int, overlap: int, align: int) -> list[tuple[int, int]]:
    """Tiles ``[start, end)`` of ``tile`` cells covering ``length`` cells, overlapping by at least
    ``overlap`` cells (spread evenly), starts on multiples of ``align`` (the last ends at ``length``)."""
    if tile >= length:
        return [(0, length)]
    step = max(tile - overlap, 1)
    count = math.ceil((length - tile) / step) + 1
    starts = []
    for i in range(count):
        start = round(i * (length - tile) / (count - 1) / align) * align
        starts.append(min(start, length - tile))
    starts[-1] = length - tile
    out: list[tuple[int, int]] = []
    for start in starts:
        if not out or out[-1][0] != start:
            out.append((start, start + tile))
    return out


def ramp(start: int, end: int, length: int, overlap: int) -> torch.Tensor:
    """Feathering weights along one axis of a tile: a raised-cosine ramp over ``overlap`` cells on
    each side that borders another tile, 1 elsewhere (also along the image border)."""
    size = end - start
    weights = torch.ones(size, dtype=torch.float64)
    if overlap <= 0:
        return weights
    index = torch.arange(size, dtype=torch.float64)
    rise = torch.sin(0.5 * math.pi * torch.clamp((index + 1) / (overlap + 1), max=1.0)) ** 2
    if start > 0:
        weights = torch.minimum(weights, rise)
    if end < length:
        weights = torch.minimum(weights, rise.flip(0))
    return weights


@dataclass(frozen=True)
class Layout:
    """The tiles of one latent grid (in grid cells) and their blending weights."""

    rows: int
    cols: int
    tiles: tuple[tuple[int, int, int, int], ...]  # (r0, r1, c0, c1)
    overlap_rows: int
    overlap_cols: int

    @classmethod
    def make(
        cls, rows: int, cols: int, tile: tuple[int, int], overlap: tuple[int, int], align: int
    ) -> Layout:
        row_spans = spans(rows, tile[0], overlap[0], align)
        col_spans = spans(cols, tile[1], overlap[1], align)
        tiles = tuple((r0, r1, c0, c1) for r0, r1 in row_spans for c0, c1 in col_spans)
        return cls(rows, cols, tiles, overlap[0], overlap[1])

    def weight(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        rows = ramp(r0, r1, self.rows, self.overlap_rows)
        cols = ramp(c0, c1, self.cols, self.overlap_cols)
        return (rows[:, None] * cols[None, :]).float()


# --------------------------------------------------------------------------- per-family geometry


def _crop_tokens(tokens: torch.Tensor, rows: int, cols: int, r0: int, r1: int, c0: int, c1: int):
    """(B, rows*cols, D) row-major tokens -> the tokens of a window, row-major."""
    batch, _, dim = tokens.shape
    grid = tokens[:, : rows * cols].reshape(batch, rows, cols, dim)
    return grid[:, r0:r1, c0:c1].reshape(batch, (r1 - r0) * (c1 - c0), dim)


def _crop_ids(ids: torch.Tensor, rows: int, cols: int, r0: int, r1: int, c0: int, c1: int):
    """FLUX position ids ((L, k) or (B, L, k); row at index 1, column at index 2), cropped and
    rebased so that the tile's first row and column are 0."""
    squeeze = ids.ndim == 2
    ids = ids[None] if squeeze else ids
    batch, _, k = ids.shape
    grid = ids.reshape(batch, rows, cols, k)[:, r0:r1, c0:c1].reshape(batch, -1, k).clone()
    grid[..., 1] -= r0
    grid[..., 2] -= c0
    return grid[0] if squeeze else grid


class Geometry:
    """How one backbone family's denoiser call is cut into tiles. Subclasses per family."""

    input_name: ClassVar[str] = "hidden_states"

    def __init__(self, pipe: Any, denoiser: torch.nn.Module):
        self.pipe = pipe
        self.denoiser = denoiser

    # pixels per grid cell, and the alignment (in cells) of tile starts and sizes
    def cell_pixels(self) -> int:
        raise NotImplementedError

    def align(self) -> int:
        return 1

    def latents(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        return kwargs[self.input_name] if self.input_name in kwargs else args[0]

    def with_latents(self, args: tuple, kwargs: dict[str, Any], value: torch.Tensor):
        if self.input_name in kwargs:
            return args, {**kwargs, self.input_name: value}
        return (value, *args[1:]), kwargs

    def grid(self, args: tuple, kwargs: dict[str, Any]) -> tuple[int, int]:
        raise NotImplementedError

    def to_grid(self, prediction: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """A prediction shaped like the denoiser input -> (B, D, rows, cols)."""
        raise NotImplementedError

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tile_call(self, args, kwargs, rows, cols, r0, r1, c0, c1) -> tuple[tuple, dict[str, Any]]:
        raise NotImplementedError


class TokenGeometry(Geometry):
    """Packed-token families (FLUX.1, FLUX.2, Qwen-Image): one token per 2x2 latent cells, row-major."""

    def cell_pixels(self) -> int:
        return self.pipe.vae_scale_factor * 2

    def _check_tokens(self, tokens: torch.Tensor, rows: int, cols: int) -> None:
        if tokens.shape[1] != rows * cols:
            raise UnsupportedError(
                f"tiled_denoise: the denoiser got {tokens.shape[1]} image tokens for a {rows}x{cols} grid "
                "(reference-image tokens, as in editing calls, cannot be tiled); disable tiling "
                "(tile_size 0, or a tile at least the image size)"
            )

    def to_grid(self, prediction, rows, cols):
        batch, _, dim = prediction.shape
        return prediction[:, : rows * cols].reshape(batch, rows, cols, dim).permute(0, 3, 1, 2)

    def from_grid(self, grid):
        batch, dim, rows, cols = grid.shape
        return grid.permute(0, 2, 3, 1).reshape(batch, rows * cols, dim)

    def tile_call(self, args, kwargs, rows, cols, r0, r1, c0, c1):
        tokens = self.latents(args, kwargs)
        self._check_tokens(tokens, rows, cols)
        args, kwargs = self.with_latents(args, kwargs, _crop_tokens(tokens, rows, cols, r0, r1, c0, c1))
        return args, self.tile_kwargs(dict(kwargs), rows, cols, r0, r1, c0, c1)

    def tile_kwargs(self, kwargs, rows, cols, r0, r1, c0, c1) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def _crop_residuals(kwargs, names, rows, cols, r0, r1, c0, c1) -> None:
        for name in names:
            samples = kwargs.get(name)
            if samples is not None:
                kwargs[name] = [
                    None if s is None else _crop_tokens(s, rows, cols, r0, r1, c0, c1) for s in samples
                ]


class FluxGeometry(TokenGeometry):
    def grid(self, args, kwargs):
        ids = kwargs.get("img_ids")
        if ids is None:
            raise UnsupportedError("tiled_denoise: the FLUX denoiser was called without img_ids")
        ids = ids[0] if ids.ndim == 3 else ids
        rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        self._check_tokens(self.latents(args, kwargs), rows, cols)
        return rows, cols

    def tile_kwargs(self, kwargs, rows, cols, r0, r1, c0, c1):
        kwargs["img_ids"] = _crop_ids(kwargs["img_ids"], rows, cols, r0, r1, c0, c1)
        names = ("controlnet_block_samples", "controlnet_single_block_samples")
        self._crop_residuals(kwargs, names, rows, cols, r0, r1, c0, c1)
        return kwargs


class Flux2Geometry(FluxGeometry):
    """FLUX.2: ids are (t, h, w, l); reference-image tokens and its KV-cache mode are refused."""

    def grid(self, args, kwargs):
        if kwargs.get("kv_cache") is not None or kwargs.get("num_ref_tokens"):
            raise UnsupportedError(
                "tiled_denoise: FLUX.2 reference-image conditioning (kv_cache / reference tokens) cannot be "
                "tiled; disable tiling"
            )
        return super().grid(args, kwargs)

    def tile_kwargs(self, kwargs, rows, cols, r0, r1, c0, c1):
        kwargs["img_ids"] = _crop_ids(kwargs["img_ids"], rows, cols, r0, r1, c0, c1)
        return kwargs


class QwenImageGeometry(TokenGeometry):
    def grid(self, args, kwargs):
        shapes = kwargs.get("img_shapes")
        if not shapes:
            raise UnsupportedError("tiled_denoise: the Qwen-Image denoiser was called without img_shapes")
        first = shapes[0]
        if isinstance(first, list):
            if len(first) != 1:
                raise UnsupportedError(
                    "tiled_denoise: Qwen-Image calls with several images per sample (editing) cannot be tiled"
                )
            first = first[0]
        _, rows, cols = (int(v) for v in first)
        self._check_tokens(self.latents(args, kwargs), rows, cols)
        return rows, cols

    def tile_kwargs(self, kwargs, rows, cols, r0, r1, c0, c1):
        shapes = kwargs["img_shapes"]
        shape = (1, r1 - r0, c1 - c0)
        kwargs["img_shapes"] = [[shape] if isinstance(s, list) else shape for s in shapes]
        self._crop_residuals(kwargs, ("controlnet_block_samples",), rows, cols, r0, r1, c0, c1)
        return kwargs


class SpatialGeometry(Geometry):
    """Families that denoise the (B, C, h, w) latent grid itself (SD3, SDXL)."""

    def cell_pixels(self) -> int:
        return self.pipe.vae_scale_factor

    def grid(self, args, kwargs):
        latents = self.latents(args, kwargs)
        rows, cols = latents.shape[-2:]
        align = self.align()
        if rows % align or cols % align:
            raise UnsupportedError(
                f"tiled_denoise: a {rows}x{cols} latent grid cannot be tiled in steps of {align} cells; use "
                f"a height and width that are multiples of {align * self.cell_pixels()} pixels"
            )
        return int(rows), int(cols)

    def to_grid(self, prediction, rows, cols):
        return prediction

    def from_grid(self, grid):
        return grid

    def tile_call(self, args, kwargs, rows, cols, r0, r1, c0, c1):
        latents = self.latents(args, kwargs)
        args, kwargs = self.with_latents(args, kwargs, latents[..., r0:r1, c0:c1])
        return args, self.tile_kwargs(dict(kwargs), rows, cols, r0, r1, c0, c1)

    def tile_kwargs(self, kwargs, rows, cols, r0, r1, c0, c1):
        return kwargs


class SD3Geometry(SpatialGeometry):
    def align(self) -> int:
        return int(self.denoiser.config.patch_size)

    def tile_kwargs(self, kwargs, rows, cols, r0, r1, c0, c1):
        samples = kwargs.get("block_controlnet_hidden_states")
        if samples is not None:  # tokens of patch_size x patch_size cells
            p = self.align()
            kwargs["block_controlnet_hidden_states"] = [
                _crop_tokens(s, rows // p, cols // p, r0 // p, r1 // p, c0 // p, c1 // p) for s in samples
            ]
        return kwargs


class SDXLGeometry(SpatialGeometry):
    input_name = "sample"

    def align(self) -> int:
        # Each down block but the last halves the grid: tiles must split every resolution exactly.
        return 2 ** (len(self.denoiser.config.block_out_channels) - 1)

    def tile_kwargs(self, kwargs, rows, cols, r0, r1, c0, c1):
        def crop(feature: torch.Tensor) -> torch.Tensor:
            scale = rows // feature.shape[-2]
            return feature[..., r0 // scale : r1 // scale, c0 // scale : c1 // scale]

        for name in ("down_block_additional_residuals", "down_intrablock_additional_residuals"):
            if kwargs.get(name) is not None:
                kwargs[name] = tuple(crop(f) for f in kwargs[name])
        if kwargs.get("mid_block_additional_residual") is not None:
            kwargs["mid_block_additional_residual"] = crop(kwargs["mid_block_additional_residual"])
        return kwargs


GEOMETRIES: dict[str, type[Geometry]] = {
    "flux": FluxGeometry,
    "flux2": Flux2Geometry,
    "qwen_image": QwenImageGeometry,
    "sd3": SD3Geometry,
    "sdxl": SDXLGeometry,
}


# --------------------------------------------------------------------------- the innermost wrapper


class _TileHook(ModelHook):
    """Used only when the denoiser has no diffusers hook registry: a plain hook is then innermost."""

    def __init__(self, forward: Callable[..., Any]):
        super().__init__()
        self._forward = forward

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self._forward(self.fn_ref.original_forward, *args, **kwargs)


class InnermostForward:
    """Wrap a module's own ``forward`` *below* every diffusers hook on it, and undo it exactly.

    diffusers' ``HookRegistry`` keeps, per hook, a reference to the next inner function; the first
    registered hook's reference (``original_forward`` when it overrides ``new_forward``, else
    ``forward``) is the module's own bound ``forward``. That reference is swapped for the wrapper on
    ``apply`` and put back on ``remove`` (also if hooks registered before it were removed meanwhile:
    diffusers then moved the reference outwards, and it is found and restored there).
    """

    def __init__(self, module: torch.nn.Module, wrapper: Callable[..., Any]):
        self.module = module
        self.wrapper = wrapper  # wrapper(inner, *args, **kwargs)
        self.hooks = HookSet()
        self._slot: tuple[Any, str, Any, Any] | None = None

    def apply(self) -> None:
        registry = self.module.__dict__.get("_diffusers_hook")
        refs = getattr(registry, "_fn_refs", None) if isinstance(registry, HookRegistry) else None
        if not refs:
            self.hooks.add(self.module, _TileHook(self.wrapper), unique_hook_name(CARRIER))
            return
        ref = refs[0]
        attr = "original_forward" if ref.original_forward is not None else "forward"
        inner = getattr(ref, attr)
        wrapped = functools.update_wrapper(functools.partial(self.wrapper, inner), inner)
        setattr(ref, attr, wrapped)
        self._slot = (ref, attr, inner, wrapped)

    def remove(self) -> None:
        self.hooks.remove_all()
        if self._slot is None:
            return
        ref, attr, inner, wrapped = self._slot
        self._slot = None
        registry = self.module.__dict__.get("_diffusers_hook")
        refs = list(getattr(registry, "_fn_refs", ()))
        # The slot it was put in, if that hook is still registered; else wherever diffusers moved it
        # when hooks below it were removed.
        candidates = ([ref] if any(r is ref for r in refs) else []) + refs
        for other in candidates:
            for name in ("forward", "original_forward"):
                if getattr(other, name, None) is wrapped:
                    setattr(other, name, inner)
                    return
        if self.module.__dict__.get("forward") is wrapped:
            # Every hook was removed before this one: diffusers made the wrapper the module's forward.
            if inner == type(self.module).forward.__get__(self.module):
                del self.module.__dict__["forward"]
            else:
                self.module.__dict__["forward"] = inner


# --------------------------------------------------------------------------- the injection


class TiledDenoiseInjection(Injection):
    def __init__(self, cache: TiledDenoiseCache, target: InjectionTarget, geometry: Geometry | None):
        self.cache = cache
        self.target = target
        self.geometry = geometry
        self.call = target.call
        self._wrap = (
            InnermostForward(target.adapter.denoiser, self._forward)
            if cache.tile_size and geometry is not None
            else None
        )
        self.tile_calls = 0  # denoiser calls made on tiles (read by tests and benchmarks)

    def apply(self) -> None:
        self.tile_calls = 0
        if self._wrap is not None:
            self._wrap.apply()

    def remove(self) -> None:
        if self._wrap is not None:
            self._wrap.remove()

    def update_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        check_call_size(self.cache, kwargs)
        updates: dict[str, Any] = {}
        if self.cache.height is not None and not (kwargs.get("height") or kwargs.get("width")):
            updates.update(height=self.cache.height, width=self.cache.width)
        no_prompt = kwargs.get("prompt") is None and kwargs.get("prompt_embeds") is None
        if self.cache.prompt is not None and no_prompt:
            updates["prompt"] = self.cache.prompt
        return {**kwargs, **updates} if updates else kwargs

    # -- per denoiser call --------------------------------------------------------------------
    def _forward(self, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self.call.active:
            return inner(*args, **kwargs)
        geometry = self.geometry
        rows, cols = geometry.grid(args, kwargs)
        cell = geometry.cell_pixels()
        tile = max(self.cache.tile_size // cell, 1)
        align = geometry.align()
        tile = max(tile // align * align, align)
        overlap = self.cache.tile_overlap // cell
        layout = Layout.make(rows, cols, (min(tile, rows), min(tile, cols)), (overlap, overlap), align)
        if len(layout.tiles) == 1:
            return inner(*args, **kwargs)
        total = weights = None
        first_output = None
        for r0, r1, c0, c1 in layout.tiles:
            tile_args, tile_kwargs = geometry.tile_call(args, kwargs, rows, cols, r0, r1, c0, c1)
            output = inner(*tile_args, **tile_kwargs)
            self.tile_calls += 1
            prediction = output[0] if isinstance(output, tuple) else output.sample
            grid = geometry.to_grid(prediction, r1 - r0, c1 - c0).float()
            if total is None:
                first_output = output
                total = grid.new_zeros((*grid.shape[:2], rows, cols))
                weights = grid.new_zeros((rows, cols))
            weight = layout.weight(r0, r1, c0, c1).to(grid.device)
            total[:, :, r0:r1, c0:c1] += grid * weight
            weights[r0:r1, c0:c1] += weight
        blended = geometry.from_grid(total / weights).to(prediction.dtype)
        if isinstance(first_output, tuple):
            return (blended, *first_output[1:])
        first_output.sample = blended
        return first_output


def check_call_size(cache: TiledDenoiseCache, kwargs: dict[str, Any]) -> None:
    """A call that asks for another size than the cache's target is an error naming the template."""
    if cache.height is None:
        return
    height, width = kwargs.get("height"), kwargs.get("width")
    if (height or width) and (int(height or 0), int(width or 0)) != (cache.height, cache.width):
        raise CacheError(
            f"template {cache.template!r} generates {cache.height}x{cache.width} pixels (height x width), "
            f"the call asks for {height}x{width}; leave height and width out of the call or pass those"
        )


class TiledDenoiseCarrier(Carrier):
    name = CARRIER
    cache_class = TiledDenoiseCache

    def supports(self, adapter: Any) -> bool:
        return getattr(adapter, "name", None) in GEOMETRIES

    def merge_caches(self, caches: list[TiledDenoiseCache]) -> TiledDenoiseCache:
        first = caches[0].settings()
        for other in caches[1:]:
            if other.settings() != first:
                raise CarrierConflictError(
                    f"tiled_denoise: templates {caches[0].template!r} and {other.template!r} ask for "
                    f"different tilings ({first} and {other.settings()}); a call is tiled one way"
                )
        names = "+".join(c.template for c in caches if c.template) or None
        return caches[0].model_copy(update={"template": names})

    def injection(self, cache: TiledDenoiseCache, target: InjectionTarget) -> TiledDenoiseInjection:
        adapter = target.adapter
        if target.branch != "cond":
            raise UnsupportedError(
                f"tiled_denoise cache from template {cache.template!r} was given as a negative template; "
                "tiling applies to the whole denoiser call, pass it in templates"
            )
        geometry_class = GEOMETRIES.get(adapter.name)
        if geometry_class is None:
            raise UnsupportedError(
                f"tiled_denoise cache from template {cache.template!r}: backbone {adapter.name!r} has no "
                f"tile geometry (supported: {sorted(GEOMETRIES)})"
            )
        geometry = geometry_class(target.pipe, adapter.denoiser)
        if cache.tile_size:
            unit = geometry.cell_pixels() * geometry.align()
            if cache.tile_size < unit:
                raise CacheError(
                    f"tiled_denoise cache from template {cache.template!r}: tile_size {cache.tile_size} px "
                    f"is smaller than backbone {adapter.name!r}'s tiling unit of {unit} px"
                )
        kwargs = getattr(target.call, "kwargs", None)
        if kwargs:
            check_call_size(cache, kwargs)
        return TiledDenoiseInjection(cache, target, geometry)
