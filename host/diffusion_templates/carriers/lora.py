"""The ``lora`` carrier: low-rank deltas added to Linear outputs, never written into weights.

Cache: per Linear module (path relative to the denoiser, e.g. ``transformer_blocks.0.attn.to_q``)
``down`` (A, shape (r, in)) and ``up`` (B, shape (out, r)) and a ``scaling`` factor (alpha / r
times any user scale). At run time a hook returns ``base(x) + B(A(x)) * scaling``, the same
arithmetic as PEFT's unfused LoRA layer, so weights stay bit-identical.
Fusing (opt-in, ``TemplatePipeline(pipe, lora_fusion="auto"|"on")``): for long calls the delta is
written into the weights once, after a copy of each weight is kept; on the way out the copy is put
back (never subtracted, so the weights come back bit for bit). See :func:`fusion_decision`.
Merge: exact. A module in one cache keeps its factors; a module in several gets the ranks
concatenated with each scaling folded into its B, so the merged delta is the sum of the scaled
deltas whatever module sets the LoRAs target.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from pydantic import Field, model_validator

from ..cache import TemplateCache
from ..context import BatchLayout, Branch, CallState, InjectionTarget
from ..errors import CacheError, CarrierConflictError
from ..injection import HookSet, Injection, unique_hook_name
from ..limits import check_lora_rank, check_magnitudes, check_number, max_lora_magnitude
from .base import Carrier, joined_template_names

_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(\.[^.]+)?\.weight$")


class LoraCache(TemplateCache):
    carrier: ClassVar[str] = "lora"

    down: dict[str, torch.Tensor]
    up: dict[str, torch.Tensor]
    scaling: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_shapes(self) -> LoraCache:
        if set(self.down) != set(self.up):
            raise ValueError(
                f"lora cache: modules with down {sorted(set(self.down) ^ set(self.up))} lack a pair"
            )
        for module, a in self.down.items():
            b = self.up[module]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(
                    f"lora cache module {module!r}: down must be (r, in) and up (out, r), "
                    f"got {tuple(a.shape)} and {tuple(b.shape)}"
                )
        if set(self.scaling) - set(self.down):
            raise ValueError(
                f"lora cache: scaling for unknown modules {sorted(set(self.scaling) - set(self.down))}"
            )
        for module, value in self.scaling.items():
            if not math.isfinite(value):
                raise ValueError(f"lora cache module {module!r}: scaling is {value!r}; it must be finite")
        return self

    def scale_of(self, module: str) -> float:
        return self.scaling.get(module, 1.0)

    def check_values(self) -> None:
        """Factors finite; |down| and |up x scaling| at most ``DT_MAX_LORA_MAGNITUDE`` (the product is
        what merging folds into up, so a merge of LoRAs within the bound stays within it)."""
        for module, value in self.scaling.items():  # also checked at validation; dicts may change since
            if not math.isfinite(value):
                check_number(self.describe, f"module {module!r} scaling", value, math.inf, "")
        fields = {"down": self.down, "up": self.up}
        check_magnitudes(
            self.describe, fields, max_lora_magnitude(), "DT_MAX_LORA_MAGNITUDE", scales={"up": self.scaling}
        )

    def delta(self, module: str) -> torch.Tensor:
        """The dense weight delta ``scaling * B @ A`` (for tests and inspection)."""
        return self.scale_of(module) * (self.up[module] @ self.down[module])

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        *,
        prefix: str = "transformer",
        scale: float = 1.0,
        alphas: Mapping[str, float] | None = None,
        template: str | None = None,
    ) -> LoraCache:
        """Build from a diffusers/PEFT state dict (``<prefix>.<module>.lora_A.weight`` keys).

        ``.alpha`` entries in the state dict (kohya style) or ``alphas`` give alpha per module;
        scaling is ``scale * alpha / r`` (``scale`` alone without alpha, as diffusers does).
        """
        down, up, alpha = {}, {}, dict(alphas or {})
        for key, tensor in state_dict.items():
            if key.endswith(".alpha"):
                alpha[_strip(key[: -len(".alpha")], prefix)] = float(tensor)
                continue
            match = _KEY.match(key)
            if match is None:
                raise CacheError(
                    f"lora state dict key {key!r} is not in diffusers/PEFT format "
                    "(<module>.lora_A.weight / <module>.lora_B.weight)"
                )
            module = _strip(match["module"], prefix)
            (down if match["kind"] in ("lora_A", "lora_down") else up)[module] = tensor
        for module, value in alpha.items():
            if not math.isfinite(value):
                raise CacheError(
                    f"lora state dict: alpha of module {module!r} is {value!r}; it must be finite"
                )
        for module, a in down.items():  # before the ranks are read: a 1-D factor has none
            b = up.get(module)
            if a.ndim != 2 or (b is not None and b.ndim != 2):
                got = f"{tuple(a.shape)} and {tuple(b.shape) if b is not None else 'none'}"
                raise CacheError(
                    f"lora state dict module {module!r}: LoRA factors must be 2-D, lora_A (r, in) and "
                    f"lora_B (out, r); got shapes {got}"
                )
        scaling = {m: scale * (alpha[m] / down[m].shape[0] if m in alpha else 1.0) for m in down}
        return cls(down=down, up=up, scaling=scaling, template=template)

    def to_state_dict(self, prefix: str = "transformer") -> dict[str, torch.Tensor]:
        """diffusers/PEFT keys, with each module's scaling folded into its B (no alpha needed)."""
        out = {}
        for module in self.down:
            out[f"{prefix}.{module}.lora_A.weight"] = self.down[module]
            out[f"{prefix}.{module}.lora_B.weight"] = self.up[module] * self.scale_of(module)
        return out


def _strip(module: str, prefix: str) -> str:
    for p in (f"base_model.model.{prefix}.", f"{prefix}.", "base_model.model."):
        if prefix and module.startswith(p):
            return module[len(p) :]
    return module


class _LoraHook(ModelHook):
    def __init__(self, down: torch.Tensor, up: torch.Tensor, scaling: float, branch: Branch, call: CallState):
        super().__init__()
        self.down, self.up, self.scaling, self.branch, self.call = down, up, scaling, branch, call

    def new_forward(self, module: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any):
        result = self.fn_ref.original_forward(x, *args, **kwargs)
        if not self.call.active:  # another thread's call of the same modules
            return result
        return add_to_branch_rows(self.call.layout, self.branch, x, result, self._delta)

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        # Same order of operations as PEFT's unfused Linear: base + B(A(x)) * scaling.
        return F.linear(F.linear(x.to(self.down.dtype), self.down), self.up) * self.scaling


def add_to_branch_rows(
    layout: BatchLayout | None,
    branch: str,
    x: torch.Tensor,
    result: torch.Tensor,
    delta: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``result`` plus ``delta(x)`` on the rows ``layout`` gives to ``branch``, the other rows as they are.

    No layout (a module run outside any denoiser call) counts as conditional as a whole, as a denoiser
    call outside any cache context does.
    """
    if layout is None:
        return result + delta(x) if branch == "cond" else result
    if layout.whole is not None:
        return result + delta(x) if layout.whole == branch else result
    if layout.rows_of(branch) is None:
        return result
    if x.shape[0] != layout.batch:
        raise RuntimeError(
            f"lora: a layer input of batch {x.shape[0]} inside a denoiser call of batch {layout.batch}; "
            "the CFG branch rows cannot be told apart"
        )
    parts = [result[rows] + delta(x[rows]) if name == branch else result[rows] for name, rows in layout.rows]
    return torch.cat(parts)


#: ``lora_fusion="auto"`` fuses from this many denoising steps on. Measured (``nox -s bench``, row 3,
#: CPU): fusing + restoring pays back after 1-3 steps on the tiny model and 6-15 steps on the medium
#: one (fused steps are 5-22% cheaper); 16 covers every measured case, and typical calls run 20-50.
FUSE_MIN_STEPS = 16
LORA_FUSION_MODES = ("off", "auto", "on")


def fusion_decision(target: InjectionTarget) -> tuple[bool, str]:
    """Whether this call's LoRA is fused into the weights, and why (for tests and logs).

    Fusing is only exact when the LoRA reaches *every* denoiser call of the call: a positive LoRA
    with classifier-free guidance running would leak into the unconditional branch, and a negative
    one always would. Fused weights are also visible to a raw diffusers call of the same modules
    from another thread (TemplatePipeline calls are serialised per denoiser): hence opt-in.
    """
    mode = target.call.extras.get("lora_fusion", "off")
    if mode == "off":
        return False, "lora_fusion is off"
    if target.branch != "cond":
        return False, "a negative-template LoRA acts on the unconditional branch only"
    if target.adapter.cfg_active(target.call.kwargs):
        return False, "classifier-free guidance runs an unconditional branch the LoRA must not reach"
    if mode == "on":
        return True, "lora_fusion is on"
    from ..imaging import call_argument

    steps = call_argument(target.pipe, target.call.kwargs, "num_inference_steps")
    if steps is None or steps < FUSE_MIN_STEPS:
        return False, f"{steps} steps: fusing pays from {FUSE_MIN_STEPS}"
    return True, f"{steps} steps >= {FUSE_MIN_STEPS}"


def fuse_into_weights(
    modules: Iterable[tuple[torch.nn.Linear, torch.Tensor, torch.Tensor, float]],
) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Add ``scaling * up @ down`` (computed in float32) into each module's weight; returns the
    backups :func:`restore_weights` puts back. A failure half-way restores what was done."""
    backups: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for module, down, up, scaling in modules:
                weight = module.weight
                backups.append((weight, weight.detach().clone()))
                delta = (up.float() @ down.float()) * scaling
                weight.copy_((weight.float() + delta).to(weight.dtype))
    except BaseException:
        restore_weights(backups)
        raise
    return backups


def restore_weights(backups: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    """Put the copies back (never subtract the delta: float rounding would drift), emptying the list."""
    with torch.no_grad():
        while backups:
            weight, backup = backups.pop()
            weight.copy_(backup)


class LoraInjection(Injection):
    def __init__(
        self,
        modules: dict[str, tuple[torch.nn.Module, torch.Tensor, torch.Tensor, float]],
        target: InjectionTarget,
    ):
        self.modules = modules
        self.target = target
        self.hooks = HookSet()
        self.backups: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self.fused = False

    def apply(self) -> None:
        self.fused, _ = fusion_decision(self.target)
        if self.fused:
            self._fuse()
            return
        name = unique_hook_name(f"lora.{self.target.branch}")
        try:
            for module, down, up, scaling in self.modules.values():
                self.hooks.add(
                    module, _LoraHook(down, up, scaling, self.target.branch, self.target.call), name
                )
        except BaseException:
            self.hooks.remove_all()
            raise

    def _fuse(self) -> None:
        self.backups = fuse_into_weights(self.modules.values())

    def _restore(self) -> None:
        restore_weights(self.backups)

    def remove(self) -> None:
        self._restore()
        self.hooks.remove_all()


class LoraCarrier(Carrier):
    name = "lora"
    cache_class = LoraCache

    def merge_caches(self, caches: list[LoraCache]) -> LoraCache:
        owners: dict[str, list[LoraCache]] = {}
        for cache in caches:
            for module in cache.down:
                owners.setdefault(module, []).append(cache)
        down, up, scaling = {}, {}, {}
        for module, group in owners.items():
            if len(group) == 1:
                down[module], up[module] = group[0].down[module], group[0].up[module]
                scaling[module] = group[0].scale_of(module)
                continue
            shapes = {(c.down[module].shape[1], c.up[module].shape[0]) for c in group}
            if len(shapes) > 1:
                raise CarrierConflictError(
                    f"lora caches disagree on the (in, out) features of module {module!r}: {sorted(shapes)}"
                )
            dtype = group[0].down[module].dtype
            down[module] = torch.cat([c.down[module].to(dtype) for c in group], dim=0)
            up[module] = torch.cat([c.up[module].to(dtype) * c.scale_of(module) for c in group], dim=1)
            scaling[module] = 1.0
        return LoraCache(down=down, up=up, scaling=scaling, template=joined_template_names(caches))

    def injection(self, cache: LoraCache, target: InjectionTarget) -> LoraInjection:
        denoiser = target.adapter.denoiser
        for path, down in cache.down.items():  # before any cast or copy: refuse absurd ranks up front
            check_lora_rank(cache.template, path, down.shape[0])
        modules = {}
        for path, down in cache.down.items():
            try:
                module = denoiser.get_submodule(path)
            except AttributeError:
                raise CacheError(
                    f"lora cache from template {cache.template!r} targets {path!r}, which "
                    f"{target.adapter.name!r} ({type(denoiser).__name__}) does not have"
                ) from None
            if not isinstance(module, torch.nn.Linear):
                raise CacheError(
                    f"lora cache from template {cache.template!r} targets {path!r}, a "
                    f"{type(module).__name__}; only torch.nn.Linear modules are supported"
                )
            up = cache.up[path]
            if down.shape[1] != module.in_features or up.shape[0] != module.out_features:
                raise CacheError(
                    f"lora cache from template {cache.template!r}, module {path!r}: factors map "
                    f"{down.shape[1]} -> {up.shape[0]} features, the layer maps "
                    f"{module.in_features} -> {module.out_features}"
                )
            cast = {"device": module.weight.device, "dtype": module.weight.dtype}
            modules[path] = (module, down.to(**cast), up.to(**cast), cache.scale_of(path))
        return LoraInjection(modules, target)
