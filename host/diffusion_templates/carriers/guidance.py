"""The ``guidance`` carrier: per-step corrections of the predicted clean sample toward a target statistic.

Cache: a list of terms. Each names an objective ``kind`` from :data:`OBJECTIVES` (``mean_rgb``,
``luminance``, ``high_frequency``; extensible with :func:`register_objective`), its ``target``
value(s), a ``strength`` and a schedule (``start``/``end`` fractions of the steps, or one weight per
step). The statistic is measured on the RGB estimate of the predicted clean latents x0 through the
pipeline's fitted linear latent -> RGB map (:mod:`diffusion_templates.latent_rgb`).
Merge: corrections add, so merging concatenates the term lists.

The math, per denoising step with noise level sigma (``scheduler.sigmas[step_index]``):

* x0 from the denoiser's prediction: flow matching ``x0 = x_t - sigma * v``; Euler epsilon
  ``x0 = x_t - sigma * eps`` (the UNet sees ``x_t / sqrt(sigma^2 + 1)``); Euler v-prediction
  ``x0 = x_t / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1)``.
* For each term with statistic ``f`` (through the map, ``J = df/dx0`` by autograd on a detached copy)
  and residual ``r = f(x0) - target``: ``dx0 = -w * J^T (J J^T)^-1 r``, the minimum-norm latent change
  that brings the linearised statistic to its target (a Gauss-Newton step; along ``J^T``, the
  objective's gradient). ``w = strength * schedule weight``: 1 closes the gap in one step, 0.5 half.
* The prediction is changed so that the step's x0 moves by the summed ``dx0``: ``v' = v - dx0 / sigma``
  (same for epsilon; ``-dx0 * sqrt(sigma^2 + 1) / sigma`` for v-prediction). The scheduler then steps
  as usual; at the last step (next sigma 0) the output moves by exactly ``dx0``.

Why a denoiser hook, and how it composes with CFG: the correction ``d`` is computed once per step, from
the first denoiser call of the step (the conditional branch: FLUX.2, FLUX.1 and Qwen-Image call it
first; for batched CFG, the conditional half of the batch), and the *same* ``d`` is added to every
branch's prediction of that step. Classifier-free guidance is an affine combination with weights
summing to one, ``u + s (c - u) = (1 - s) u + s c``, so the guided prediction moves by exactly ``d``:
the correction does not scale with the CFG scale and does not depend on the CFG style. Correcting
only the conditional branch would multiply it by the guidance scale; a step-end callback would have
to recover the guided prediction from two latents (dividing by ``sigma_next - sigma``), which loses
precision in bfloat16. Qwen-Image rescales the guided prediction to the conditional one's norm
after combining, so there the shift is ``d`` up to that rescaling.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..cache import TemplateCache
from ..context import BatchLayout, InjectionTarget
from ..errors import CacheError, UnsupportedError
from ..injection import HookSet, Injection, unique_hook_name
from ..latent_rgb import LatentRGBMap, latent_rgb_map
from ..limits import check_number, max_guidance_strength
from .base import Carrier, joined_template_names

__all__ = [
    "OBJECTIVES",
    "GuidanceCache",
    "GuidanceCarrier",
    "GuidanceTerm",
    "Objective",
    "gauss_newton_step",
    "register_objective",
]


# --------------------------------------------------------------------------- objectives


@dataclass(frozen=True)
class Objective:
    """A differentiable statistic of the RGB estimate: ``statistic(rgb (B, 3, h, w)) -> (B, size)``.

    RGB is in [0, 1], one value per latent cell. ``low``/``high`` bound every target value.
    """

    name: str
    size: int
    statistic: Callable[[torch.Tensor], torch.Tensor]
    low: float = 0.0
    high: float = 1.0
    description: str = ""


OBJECTIVES: dict[str, Objective] = {}


def register_objective(objective: Objective) -> Objective:
    """Add (or replace) an objective kind; guidance terms name it by ``objective.name``."""
    if objective.size < 1:
        raise ValueError(f"objective {objective.name!r}: size must be >= 1")
    OBJECTIVES[objective.name] = objective
    return objective


#: Rec. 709 luma weights (on the map's [0, 1] RGB, without linearisation).
LUMA = (0.2126, 0.7152, 0.0722)


def _mean_rgb(rgb: torch.Tensor) -> torch.Tensor:
    return rgb.mean(dim=(2, 3))


def _luminance(rgb: torch.Tensor) -> torch.Tensor:
    weights = rgb.new_tensor(LUMA).view(1, 3, 1, 1)
    return (rgb * weights).sum(dim=1).mean(dim=(1, 2)).unsqueeze(1)


def _high_frequency(rgb: torch.Tensor) -> torch.Tensor:
    blurred = F.avg_pool2d(F.pad(rgb, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    energy = (rgb - blurred).square().mean(dim=(1, 2, 3))
    return (energy + 1e-12).sqrt().unsqueeze(1)


register_objective(Objective("mean_rgb", 3, _mean_rgb, description="mean R, G, B of the image"))
register_objective(Objective("luminance", 1, _luminance, description="mean Rec. 709 luma"))
register_objective(
    Objective(
        "high_frequency",
        1,
        _high_frequency,
        description="RMS of RGB minus its 3x3 box blur, at latent-cell resolution (sqrt of the HF energy)",
    )
)


# --------------------------------------------------------------------------- cache


class GuidanceTerm(BaseModel):
    """One objective with its target, strength and schedule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    target: list[float]
    strength: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)
    start: float = Field(default=0.0, ge=0.0, le=1.0)
    end: float = Field(default=1.0, ge=0.0, le=1.0)
    weights: list[float] | None = None
    """One weight per denoising step (overrides start/end); the call must run exactly that many steps."""

    @field_validator("target", mode="before")
    @classmethod
    def _scalar_target(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [float(value)]
        if isinstance(value, torch.Tensor):
            return [float(v) for v in value.flatten()]
        return value

    @model_validator(mode="after")
    def _check(self) -> GuidanceTerm:
        objective = OBJECTIVES.get(self.kind)
        if objective is None:
            raise ValueError(f"unknown guidance kind {self.kind!r}; known kinds are {sorted(OBJECTIVES)}")
        if len(self.target) != objective.size:
            raise ValueError(
                f"guidance kind {self.kind!r} takes {objective.size} target value(s), got {len(self.target)}"
            )
        for value in self.target:
            if not (objective.low <= value <= objective.high):
                raise ValueError(
                    f"guidance kind {self.kind!r}: target {value!r} is outside "
                    f"[{objective.low}, {objective.high}]"
                )
        if self.weights is not None:
            if self.start != 0.0 or self.end != 1.0:
                raise ValueError("guidance term: give either per-step weights or start/end, not both")
            if not self.weights:
                raise ValueError("guidance term: weights must list one weight per step")
            if not all(math.isfinite(w) and w >= 0 for w in self.weights):
                raise ValueError(f"guidance term: weights must be finite and >= 0, got {self.weights}")
        elif self.start >= self.end:
            raise ValueError(f"guidance term: start ({self.start}) must be below end ({self.end})")
        return self

    @property
    def objective(self) -> Objective:
        return OBJECTIVES[self.kind]

    def weight_at(self, step: int, steps: int) -> float:
        """Schedule weight of step ``step`` of ``steps`` (diffusers' control_guidance_start/end rule)."""
        if self.weights is not None:
            return self.weights[step] if step < len(self.weights) else 0.0
        return 0.0 if step / steps < self.start or (step + 1) / steps > self.end else 1.0

    @property
    def active(self) -> bool:
        return self.strength > 0 and (self.weights is None or any(w > 0 for w in self.weights))


class GuidanceCache(TemplateCache):
    carrier: ClassVar[str] = "guidance"

    terms: list[GuidanceTerm] = Field(min_length=1)

    def check_values(self) -> None:
        """Each term's strength, and strength x its largest step weight, at most
        ``DT_MAX_GUIDANCE_STRENGTH`` (finiteness and targets are the terms' own validation)."""
        limit, setting = max_guidance_strength(), "DT_MAX_GUIDANCE_STRENGTH"
        who = self.describe
        for i, term in enumerate(self.terms):
            check_number(who, f"term {i} ({term.kind!r}) strength", term.strength, limit, setting)
            if term.weights:
                peak = term.strength * max(term.weights)
                field = f"term {i} ({term.kind!r}) strength x largest step weight"
                check_number(who, field, peak, limit, setting)

    @classmethod
    def single(
        cls,
        kind: str,
        target: float | list[float],
        strength: float = 1.0,
        *,
        start: float = 0.0,
        end: float = 1.0,
        weights: list[float] | None = None,
        template: str | None = None,
    ) -> GuidanceCache:
        """One-term cache, e.g. ``GuidanceCache.single(kind="luminance", target=0.8, strength=1.0)``."""
        term = GuidanceTerm(
            kind=kind, target=target, strength=strength, start=start, end=end, weights=weights
        )
        return cls(terms=[term], template=template)


# --------------------------------------------------------------------------- math


def gauss_newton_step(
    objective: Objective, target: torch.Tensor, rgb_map: LatentRGBMap, x0: torch.Tensor
) -> torch.Tensor:
    """``-J^T (J J^T)^-1 (f(x0) - target)`` per sample: the minimum-norm change of the latent grid
    ``x0`` (B, C, h, w) that moves the linearised statistic to ``target`` (size,)."""
    with torch.inference_mode(False), torch.enable_grad():
        x = x0.detach().float().clone().requires_grad_(True)
        stat = objective.statistic(rgb_map.to_rgb(x))
        if stat.shape != (x.shape[0], objective.size):
            raise RuntimeError(
                f"guidance objective {objective.name!r} returned {tuple(stat.shape)}, "
                f"expected ({x.shape[0]}, {objective.size})"
            )
        rows = [
            torch.autograd.grad(stat[:, j].sum(), x, retain_graph=j + 1 < objective.size)[0]
            for j in range(objective.size)
        ]
    jac = torch.stack(rows, dim=1).flatten(2).double()  # (B, k, D)
    residual = stat.detach().double() - target.to(jac.device, torch.float64)  # (B, k)
    gram = jac @ jac.transpose(1, 2)  # (B, k, k)
    scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-300)  # (B,)
    eye = torch.eye(objective.size, dtype=gram.dtype, device=gram.device)
    coef = torch.linalg.solve(gram + 1e-12 * scale.view(-1, 1, 1) * eye, residual.unsqueeze(-1))
    step = -(jac.transpose(1, 2) @ coef).squeeze(-1)  # (B, D)
    return step.view_as(x).float()


@dataclass(frozen=True)
class _Parametrization:
    """How the denoiser's input and output relate to x_t and x0 at noise level sigma."""

    prediction: Literal["flow", "epsilon", "v_prediction"]
    scaled_input: bool  # Euler schedulers feed the denoiser x_t / sqrt(sigma^2 + 1)

    def sample(self, model_input: torch.Tensor, sigma: float) -> torch.Tensor:
        x = model_input.float()
        return x * math.sqrt(sigma**2 + 1) if self.scaled_input else x

    def x0(self, x_t: torch.Tensor, prediction: torch.Tensor, sigma: float) -> torch.Tensor:
        prediction = prediction.float()
        if self.prediction == "v_prediction":
            return prediction * (-sigma / math.sqrt(sigma**2 + 1)) + x_t / (sigma**2 + 1)
        return x_t - sigma * prediction

    def prediction_shift(self, dx0: torch.Tensor, sigma: float) -> torch.Tensor:
        """The change of the prediction that moves x0 by ``dx0`` (x_t fixed)."""
        if self.prediction == "v_prediction":
            return dx0 * (-math.sqrt(sigma**2 + 1) / sigma)
        return dx0 / -sigma


def parametrization(scheduler: Any) -> _Parametrization:
    """The parametrization for ``scheduler``; UnsupportedError for schedulers without a sigma per step."""
    from diffusers import (
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
    )

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return _Parametrization("flow", scaled_input=False)
    if isinstance(scheduler, (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler)):
        kind = scheduler.config.prediction_type
        if kind not in ("epsilon", "v_prediction"):
            raise UnsupportedError(f"guidance: {type(scheduler).__name__} with prediction_type {kind!r}")
        return _Parametrization(kind, scaled_input=True)
    raise UnsupportedError(
        f"guidance needs a scheduler whose sigma per step defines x0 from the prediction "
        f"(FlowMatchEulerDiscreteScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler); "
        f"the pipeline runs {type(scheduler).__name__}"
    )


# --------------------------------------------------------------------------- injection


def _call_default(pipe: Any, kwargs: dict[str, Any], name: str) -> Any:
    if kwargs.get(name) is not None:
        return kwargs[name]
    parameter = inspect.signature(type(pipe).__call__).parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


class _GuidanceHook(ModelHook):
    def __init__(self, injection: GuidanceInjection):
        super().__init__()
        self.injection = injection

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any):
        output = self.fn_ref.original_forward(*args, **kwargs)
        if not self.injection.target.call.active:  # another thread's call of the same denoiser
            return output
        return self.injection.correct(args, kwargs, output)


class GuidanceInjection(Injection):
    """Adds the step's correction to every denoiser prediction of that step (see the module doc)."""

    def __init__(self, terms: list[GuidanceTerm], rgb_map: LatentRGBMap, param: _Parametrization, target):
        self.terms = terms
        self.rgb_map = rgb_map
        self.param = param
        self.target: InjectionTarget = target
        self.hooks = HookSet()
        self.size: tuple[int, int] | None = None
        self._step: int | None = None
        self._delta: torch.Tensor | None = None

    def apply(self) -> None:
        self._step, self._delta = None, None
        self.hooks.add(self.target.adapter.denoiser, _GuidanceHook(self), unique_hook_name("guidance"))

    def remove(self) -> None:
        self.hooks.remove_all()
        self._step, self._delta = None, None

    def update_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        pipe = self.target.pipe
        adapter = self.target.adapter
        default = adapter.default_size() if hasattr(adapter, "default_size") else (None, None)
        height = kwargs.get("height") or default[0] or pipe.default_sample_size * pipe.vae_scale_factor
        width = kwargs.get("width") or default[1] or pipe.default_sample_size * pipe.vae_scale_factor
        self.size = (int(height), int(width))
        # Per-step weights must match the step count. Known here for a custom schedule or a text-to-image
        # pipeline; otherwise (img2img ``strength``) the first denoiser call checks the scheduler's count.
        custom = kwargs.get("sigmas") if kwargs.get("sigmas") is not None else kwargs.get("timesteps")
        steps = None
        if custom is not None:
            steps = len(custom)
        elif "strength" not in inspect.signature(type(pipe).__call__).parameters:
            steps = _call_default(pipe, kwargs, "num_inference_steps")
        self._check_weights(steps)
        return kwargs

    def _check_weights(self, steps: int | None) -> None:
        for term in self.terms:
            if term.weights is not None and steps is not None and len(term.weights) != int(steps):
                raise CacheError(
                    f"guidance term {term.kind!r} lists {len(term.weights)} step weights, the call runs "
                    f"{steps} steps"
                )

    # -- per denoiser call ------------------------------------------------------------------------
    def _step_index(self) -> tuple[int, int, int]:
        scheduler = self.target.pipe.scheduler
        first = scheduler.begin_index if scheduler.begin_index is not None else 0
        index = scheduler.step_index if scheduler.step_index is not None else first
        return index, index - first, len(scheduler.timesteps) - first

    def correct(self, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        prediction = output[0] if isinstance(output, tuple) else output.sample
        index, step, steps = self._step_index()
        if self._step is None:  # first denoiser call of the call: the scheduler knows the step count
            self._check_weights(steps)
        weights = [term.strength * term.weight_at(step, steps) for term in self.terms]
        sigma = float(self.target.pipe.scheduler.sigmas[index])
        if self._step != index:
            self._step, self._delta = index, None
            if any(w > 0 for w in weights) and sigma > 0:
                sample = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
                self._delta = self._correction(sample, prediction, sigma, weights)
        delta = self._delta
        if delta is None:
            return output
        delta = _per_row(self.target.call.layout, delta, prediction.shape[0])
        if prediction.shape[0] != delta.shape[0]:
            raise RuntimeError(
                f"guidance: denoiser call with batch {prediction.shape[0]}, correction computed for "
                f"{delta.shape[0]}"
            )
        if prediction.ndim == 3 and prediction.shape[1] > delta.shape[1]:  # reference-image tokens
            delta = F.pad(delta, (0, 0, 0, prediction.shape[1] - delta.shape[1]))
        corrected = prediction + delta.to(prediction.dtype)
        if isinstance(output, tuple):
            return (corrected, *output[1:])
        output.sample = corrected
        return output

    def _correction(
        self, sample: torch.Tensor, prediction: torch.Tensor, sigma: float, weights
    ) -> torch.Tensor:
        """The prediction shift (loop layout, conditional batch) for this step."""
        rows = _conditional_rows(self.target.call.layout)
        if rows is not None:  # batched CFG: from the conditional rows (one per image)
            sample, prediction = sample[rows], prediction[rows]
        height, width = self.size or (None, None)
        adapter = self.target.adapter
        x_t = self.param.sample(sample, sigma)
        x0 = adapter.unpack_latents(self.param.x0(x_t, prediction, sigma), height, width)
        dx0 = torch.zeros_like(x0, dtype=torch.float32)
        for term, weight in zip(self.terms, weights, strict=True):
            if weight > 0:
                target = torch.tensor(term.target, dtype=torch.float32)
                dx0 += weight * gauss_newton_step(term.objective, target, self.rgb_map, x0)
        return adapter.repack_latents(self.param.prediction_shift(dx0, sigma), height, width)


def _conditional_rows(layout: BatchLayout | None) -> slice | None:
    """The rows of the step's first call to compute the correction from: its conditional rows when the
    call is split between branches, None (every row) when it is one branch as a whole."""
    if layout is None or layout.whole is not None:
        return None
    return layout.rows_of("cond")


def _per_row(layout: BatchLayout | None, delta: torch.Tensor, batch: int) -> torch.Tensor:
    """The correction (one row per image) for every row of a call: each branch's rows get it, so the
    guided combination of the branches moves by exactly ``delta``."""
    if layout is None or layout.whole is not None or batch == delta.shape[0]:
        return delta
    parts = [delta for _, rows in layout.rows if (rows.stop - rows.start) == delta.shape[0]]
    return torch.cat(parts) if len(parts) == len(layout.rows) else delta


class _Inactive(Injection):
    """A guidance cache whose every term has zero strength: nothing to install."""


class GuidanceCarrier(Carrier):
    name = "guidance"
    cache_class = GuidanceCache

    def merge_caches(self, caches: list[GuidanceCache]) -> GuidanceCache:
        return GuidanceCache(
            terms=[t for c in caches for t in c.terms], template=joined_template_names(caches)
        )

    def injection(self, cache: GuidanceCache, target: InjectionTarget) -> Injection:
        if target.branch != "cond":
            raise UnsupportedError(
                f"guidance cache from template {cache.template!r}: guidance corrects the whole (guided) "
                "prediction, not one CFG branch; pass it in templates, not negative_templates"
            )
        adapter = target.adapter
        for method in ("unpack_latents", "repack_latents", "encode_images"):
            if not callable(getattr(adapter, method, None)):
                raise UnsupportedError(f"guidance: backbone {adapter.name!r} has no {method} method")
        param = parametrization(target.pipe.scheduler)
        terms = [t for t in cache.terms if t.active]
        if not terms:
            return _Inactive()
        return GuidanceInjection(terms, latent_rgb_map(adapter), param, target)
