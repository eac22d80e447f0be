"""The ``residual`` carrier: per-block residuals added to the denoiser's hidden states, ControlNet style.

Cache: a list of *entries*, each a source of residuals with its own ``conditioning_scale`` and step
window (``start``/``end``, fractions of the denoising, as diffusers' ``control_guidance_start/end``):

* a ControlNet (an in-memory module, not saved, or ``controlnet``: a folder or hub id loaded with
  ``from_pretrained``) with its control in ``control[<entry>]``: either the prepared conditioning
  (what diffusers' ControlNet pipeline of that family feeds the ControlNet, e.g. packed VAE latents
  for FLUX.1), or, with ``prepare=True``, the control *image* (preprocessed pixels) that the carrier
  prepares for each call with the adapter's ``prepare_control_image``, as diffusers does: one VAE
  sample per image, and on SD3 per CFG half. ControlNet residuals depend on the step, so the
  ControlNet runs at every denoiser call, on the denoiser's own inputs;
* or static residuals ``residuals["<entry>/<group>/<k>"]`` (e.g. ``0/double/1``), fixed per-block
  tensors a template computed once. They are scaled like a ControlNet's output.

Injection: a ``ModelHook`` on the denoiser computes, per call, ``sum_e scale_e * keep_e(step) * r_e``
and passes it through the denoiser's native ControlNet kwargs (FLUX.1/Qwen-Image
``controlnet_block_samples``..., SD3 ``block_controlnet_hidden_states``, SDXL
``down_block_additional_residuals``/``mid_block_additional_residual``), exactly as diffusers'
ControlNet pipelines do: with sequential CFG the ControlNets run once per step on the conditional
inputs and the unconditional call reuses their residuals; with batched CFG they see the doubled
batch (SDXL ``guess_mode``: the conditional half only, zeros for the other). The control reaches each
row of a denoiser call by the call's ``BatchLayout``: a batch of 1 applies to every image, a batch
of the call's image count gives one per image, in every branch.
Merge: the entries of all caches, in order; at run time their residuals are summed per block, as
diffusers' MultiControlNet sums its nets' outputs. Entries whose residual counts differ are mapped
to the denoiser's blocks first (diffusers' block-interval rule), then summed per block.

Adapters opt in by listing ``"residual"`` in ``carriers`` and implementing the methods of
:class:`ResidualAdapter`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol

import torch
from diffusers.hooks import ModelHook
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..cache import TemplateCache
from ..context import BatchLayout, InjectionTarget
from ..errors import CacheError, UnsupportedError
from ..injection import HookSet, Injection, PerThreadContext, denoiser_layout, unique_hook_name
from ..limits import check_magnitudes, check_number, max_conditioning_scale, max_residual_magnitude
from .base import Carrier, joined_template_names

# --------------------------------------------------------------------------- adapter protocol


class ResidualSlots(NamedTuple):
    """Where one group of residuals goes in a denoiser (e.g. FLUX.1 ``double``/``single`` blocks).

    ``blocks``: how many blocks of the group the denoiser has. ``exact``: a source must give
    exactly one residual per block (SDXL); otherwise 1..``blocks`` residuals spread over the blocks
    by diffusers' interval rule. ``required``: every source must give this group (SDXL needs both
    ``down`` and ``mid``, or its UNet takes the residuals for T2I-Adapter ones).
    """

    blocks: int
    exact: bool = False
    required: bool = False


Residuals = dict[str, list[torch.Tensor]]


class ResidualAdapter(Protocol):
    """What a backbone adapter implements to support the ``residual`` carrier."""

    controlnet_classes: ClassVar[tuple[str, ...]]
    """ControlNet classes (names) this backbone's diffusers ControlNet pipeline drives."""

    residual_options: ClassVar[frozenset[str]]
    """Which optional entry fields apply: ``"guess_mode"`` (SDXL), ``"control_mode"`` (FLUX union)."""

    def residual_slots(self) -> dict[str, ResidualSlots]: ...

    def residual_index(self, group: str, block: int, count: int, repeat: bool) -> int:
        """Which of ``count`` residuals the denoiser adds after block ``block`` (diffusers' rule)."""

    def residual_shape(self, group: str, index: int, height: int | None, width: int | None) -> tuple:
        """Per-sample shape of residual ``index``; size-dependent dims are None when the size is."""

    def residual_kwargs(self, residuals: Residuals, repeat: bool) -> dict[str, Any]:
        """The denoiser kwargs carrying ``residuals``."""

    def existing_residuals(self, inputs: dict[str, Any]) -> tuple[Residuals, bool] | None:
        """Residuals the pipeline itself already passes to the denoiser (a ControlNet pipeline)."""

    def check_controlnet(self, controlnet: torch.nn.Module, entry: ResidualEntry) -> dict[str, int]:
        """Raise CacheError if ``controlnet`` does not fit the denoiser; return residuals per group."""

    def control_shape(self, controlnet: torch.nn.Module, height: int, width: int) -> tuple[int, ...]:
        """Per-sample shape of the prepared control conditioning for a ``height`` x ``width`` call."""

    def preprocess_control_image(self, image: Any, *, height: int, width: int) -> torch.Tensor:
        """The image processor step of diffusers' ControlNet pipeline: pixels (B, C, H, W), float32."""

    def prepare_control_image(self, image: Any, *, controlnet: torch.nn.Module, height: int, width: int,
                              generator: torch.Generator | None = None, batch_size: int = 1,
                              do_classifier_free_guidance: bool = False,
                              guess_mode: bool = False) -> torch.Tensor:
        """What diffusers' ControlNet pipeline does to its ``control_image`` before denoising."""

    def controlnet_residuals(self, controlnet: torch.nn.Module, control: torch.Tensor, scale: float,
                             inputs: dict[str, Any], entry: ResidualEntry,
                             layout: BatchLayout | None = None) -> tuple[Residuals, bool]:
        """Run ``controlnet`` on the denoiser call's ``inputs`` (``control`` has the call's batch); the
        residuals and the repeat flag. ``layout``: the call's rows per CFG branch."""


def fit_batch(control: torch.Tensor, batch: int) -> torch.Tensor:
    """A control conditioning of batch 1 expanded to ``batch``; one of batch ``batch`` as it is.

    The carrier hands adapters a control laid out for the call's rows already (``ResidualInjection``
    maps it per CFG branch and refuses a wrong image count before denoising); this is a backstop."""
    if control.shape[0] == batch:
        return control
    if control.shape[0] == 1:
        return control.expand(batch, *control.shape[1:])
    raise CacheError(
        f"residual cache: the control conditioning has {control.shape[0]} rows for a ControlNet call of "
        f"{batch} rows"
    )


def adapter_supports_residuals(adapter: Any) -> bool:
    return "residual" in getattr(adapter, "carriers", ()) and hasattr(adapter, "controlnet_residuals")


# --------------------------------------------------------------------------- cache


class ResidualEntry(BaseModel):
    """One source of residuals (its tensors live in the cache, under its index)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, allow_inf_nan=False)

    controlnet: str | None = None
    """A folder or hub id of the ControlNet, loaded with ``from_pretrained`` (safetensors only)."""
    module: Any = Field(default=None, exclude=True)
    """An in-memory ControlNet (never saved; set ``controlnet`` for a cache that can be saved)."""
    conditioning_scale: float = 1.0
    start: float = Field(0.0, ge=0.0, le=1.0)
    end: float = Field(1.0, ge=0.0, le=1.0)
    guess_mode: bool = False
    """SDXL: the ControlNet sees only the conditional half of a CFG batch (diffusers' guess_mode)."""
    control_mode: int | None = None
    """FLUX.1 union ControlNets: the control type index (diffusers' ``control_mode``)."""
    prepare: bool = False
    """``control[<entry>]`` is the control image (pixels from the adapter's ``preprocess_control_image``,
    batch 1 or one per image), prepared by the carrier for each call: the call's image count, its CFG,
    one VAE sample per image (and per CFG half where diffusers draws one), as diffusers does."""
    seed: int | None = None
    """With ``prepare``: the seed of the VAE sample (a fresh generator per call); None with neither
    ``seed`` nor ``generator``: the global RNG (what diffusers' SD3 ControlNet pipeline uses)."""
    generator: Any = Field(default=None, exclude=True)
    """With ``prepare``: a torch.Generator to sample with (e.g. the call's own, to draw in diffusers'
    order: FLUX.1 and Qwen-Image sample the control with it before the initial noise); never saved."""

    @model_validator(mode="after")
    def _check(self) -> ResidualEntry:
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(self.generator).__name__}")
        if self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be smaller than end ({self.end})")
        if self.module is not None and not isinstance(self.module, torch.nn.Module):
            raise ValueError(f"module must be a torch.nn.Module, got {type(self.module).__name__}")
        return self

    @property
    def has_controlnet(self) -> bool:
        return self.module is not None or self.controlnet is not None

    def sampler(self) -> torch.Generator | None:
        """The generator of this call's VAE sample of a ``prepare`` entry (None: the global RNG)."""
        if self.generator is not None:
            return self.generator
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)

    def keep(self, step: int, steps: int) -> float:
        """1.0 inside the step window, else 0.0: diffusers' ``controlnet_keep`` for step ``step``."""
        return 1.0 - float(step / steps < self.start or (step + 1) / steps > self.end)


class ResidualCache(TemplateCache):
    carrier: ClassVar[str] = "residual"

    entries: list[ResidualEntry]
    control: dict[str, torch.Tensor] = Field(default_factory=dict)
    """Prepared control conditioning of each ControlNet entry, by entry index (``"0"``)."""
    residuals: dict[str, torch.Tensor] = Field(default_factory=dict)
    """Static residuals, ``"<entry>/<group>/<k>"`` (e.g. ``"0/double/1"``)."""

    @model_validator(mode="after")
    def _check(self) -> ResidualCache:
        if not self.entries:
            raise ValueError("residual cache: no entries")
        ids = {str(i) for i in range(len(self.entries))}
        if set(self.control) - ids:
            raise ValueError(f"residual cache: control for unknown entries {sorted(set(self.control) - ids)}")
        static: dict[str, dict[str, set[int]]] = {}
        for key, tensor in {**self.control, **self.residuals}.items():
            if not tensor.is_floating_point():
                raise ValueError(f"residual cache: tensor {key!r} must be floating, got {tensor.dtype}")
        for key in self.residuals:
            parts = key.split("/")
            if len(parts) != 3 or parts[0] not in ids or not parts[2].isdigit():
                raise ValueError(
                    f"residual cache: static residual key {key!r} is not '<entry>/<group>/<k>' "
                    f"with an entry in 0..{len(self.entries) - 1}"
                )
            static.setdefault(parts[0], {}).setdefault(parts[1], set()).add(int(parts[2]))
        for i, entry in enumerate(self.entries):
            has_control, has_static = str(i) in self.control, str(i) in static
            if entry.has_controlnet and not has_control:
                raise ValueError(f"residual cache entry {i}: a ControlNet entry needs control[{str(i)!r}]")
            if entry.has_controlnet and has_static:
                raise ValueError(f"residual cache entry {i}: has both a ControlNet and static residuals")
            if not entry.has_controlnet and has_control:
                raise ValueError(
                    f"residual cache entry {i}: has a control conditioning but no ControlNet (in-memory "
                    "modules are not saved: set `controlnet` to its folder or hub id)"
                )
            if not entry.has_controlnet and not has_static:
                raise ValueError(f"residual cache entry {i}: neither a ControlNet nor static residuals")
            for group, indices in static.get(str(i), {}).items():
                if indices != set(range(len(indices))):
                    raise ValueError(
                        f"residual cache entry {i}, group {group!r}: residual indices {sorted(indices)} "
                        f"must be 0..{len(indices) - 1}"
                    )
        return self

    def check_values(self) -> None:
        """Each entry's |conditioning_scale| at most ``DT_MAX_CONDITIONING_SCALE``; control inputs and
        static residuals finite, |value| at most ``DT_MAX_RESIDUAL_MAGNITUDE``."""
        who = self.describe
        limit = max_conditioning_scale()
        for i, entry in enumerate(self.entries):
            scale = entry.conditioning_scale
            check_number(who, f"entry {i} conditioning_scale", scale, limit, "DT_MAX_CONDITIONING_SCALE")
        fields = {"control": self.control, "residuals": self.residuals}
        check_magnitudes(who, fields, max_residual_magnitude(), "DT_MAX_RESIDUAL_MAGNITUDE")

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_controlnet(
        cls,
        controlnet: torch.nn.Module | str,
        control: torch.Tensor,
        *,
        conditioning_scale: float = 1.0,
        start: float = 0.0,
        end: float = 1.0,
        guess_mode: bool = False,
        control_mode: int | None = None,
        template: str | None = None,
    ) -> ResidualCache:
        """One ControlNet (a module, or a folder/hub id) with its prepared control conditioning."""
        source = {"controlnet": controlnet} if isinstance(controlnet, str) else {"module": controlnet}
        entry = ResidualEntry(
            **source, conditioning_scale=conditioning_scale, start=start, end=end,
            guess_mode=guess_mode, control_mode=control_mode,
        )  # fmt: skip
        return cls(entries=[entry], control={"0": control}, template=template)

    @classmethod
    def from_residuals(
        cls,
        residuals: Mapping[str, Sequence[torch.Tensor]],
        *,
        conditioning_scale: float = 1.0,
        start: float = 0.0,
        end: float = 1.0,
        template: str | None = None,
    ) -> ResidualCache:
        """Fixed residuals per group (the adapter's groups, e.g. ``{"double": [r0, r1]}``)."""
        flat = {f"0/{group}/{k}": t for group, tensors in residuals.items() for k, t in enumerate(tensors)}
        entry = ResidualEntry(conditioning_scale=conditioning_scale, start=start, end=end)
        return cls(entries=[entry], residuals=flat, template=template)

    def static_residuals(self, entry: int) -> Residuals:
        groups: dict[str, dict[int, torch.Tensor]] = {}
        for key, tensor in self.residuals.items():
            index, group, k = key.split("/")
            if int(index) == entry:
                groups.setdefault(group, {})[int(k)] = tensor
        return {group: [tensors[k] for k in range(len(tensors))] for group, tensors in groups.items()}

    def save(self, path: Any) -> None:
        unsaved = [i for i, e in enumerate(self.entries) if e.module is not None and e.controlnet is None]
        if unsaved:
            raise CacheError(
                f"residual cache from template {self.template!r}: entries {unsaved} hold in-memory "
                "ControlNets, which are not saved; set their `controlnet` to a folder or hub id first"
            )
        super().save(path)


# --------------------------------------------------------------------------- injection


class _Plan(NamedTuple):
    """One validated entry, ready to run: its ControlNet and control (or its static residuals)."""

    index: int
    entry: ResidualEntry
    controlnet: torch.nn.Module | None
    control: torch.Tensor | None
    """The cache's control (the prepared conditioning, or the image of a ``prepare`` entry)."""
    static: Residuals | None
    rows: dict[str, torch.Tensor] | None = None
    """The prepared control per CFG branch, each of batch 1 or one row per image."""


class _Contribution(NamedTuple):
    residuals: Residuals
    repeat: bool


_SIGNATURES: dict[type, inspect.Signature] = {}


def _bind(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The denoiser call's arguments by name (positional ones included)."""
    klass = type(module)
    if klass not in _SIGNATURES:
        _SIGNATURES[klass] = inspect.signature(klass.forward)
    bound = _SIGNATURES[klass].bind_partial(module, *args, **kwargs).arguments
    bound.pop(next(iter(_SIGNATURES[klass].parameters)))  # self
    return dict(bound)


class _ResidualHook(ModelHook):
    """Adds the residuals to every denoiser call; stateful, to read diffusers' cond/uncond context."""

    _is_stateful = True

    def __init__(self, injection: ResidualInjection):
        super().__init__()
        self.injection = injection
        # Per thread: a bare call's ``cache_context`` in another thread must not move our branch.
        self.state_manager = PerThreadContext()

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any):
        if not self.injection.target.call.active:  # another thread's call of the same denoiser
            return args, kwargs
        context = self.state_manager.current
        uncond = context is not None and context.name == "uncond"
        return (), self.injection.call_kwargs(module, args, kwargs, uncond)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state_manager.reset()
        return module


class ResidualInjection(Injection):
    #: Steps are counted with the pipeline's step-end callback (diffusers' loop index ``i``).
    step_tensor_inputs = ("latents",)

    def __init__(
        self, plans: list[_Plan], template: str | None, target: InjectionTarget, images: int | None = None
    ):
        self.plans = plans
        self.template = template
        self.target = target
        self.adapter = target.adapter
        self.images = images  # the call's image count, for the rows of each denoiser call
        self.hooks = HookSet()
        self.step = 0
        self._cond: tuple[int, list[_Contribution]] | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def update_call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Check the control conditioning and static residuals against the call's image size.

        The call's size is first known here (before the pipeline runs, after ``apply``); if the host
        hands the call's kwargs to ``inject`` (``target.call.kwargs``) the check already ran there.
        """
        check_sizes(self.plans, self.template, self.target, kwargs)
        return kwargs

    def apply(self) -> None:
        self.step, self._cond = 0, None
        self.hooks.add(self.adapter.denoiser, _ResidualHook(self), unique_hook_name("residual"))

    def remove(self) -> None:
        self.hooks.remove_all()
        self._cond = None

    def on_step_end(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        self.step = step + 1
        return {}

    # -- per denoiser call ---------------------------------------------------------------------
    def _steps(self) -> int:
        """diffusers' ``len(timesteps)`` of the loop that the window fractions refer to."""
        scheduler = getattr(self.target.pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is not None and len(timesteps):
            return len(timesteps) - (getattr(scheduler, "begin_index", None) or 0)
        return int(self.target.pipe._num_timesteps)

    def call_kwargs(self, module: torch.nn.Module, args: tuple, kwargs: dict, uncond: bool) -> dict[str, Any]:
        inputs = _bind(module, args, kwargs)
        # This hook runs before the BranchTracker's (diffusers runs later hooks first): the same layout
        # function, on this call, instead of the previous call's ``call.layout``.
        layout = denoiser_layout(
            self.adapter, self.target.call, self.images, "uncond" if uncond else None, (), inputs
        )
        uncond = layout.whole == "uncond"
        if uncond and self._cond is not None and self._cond[0] == self.step:
            contributions = self._cond[1]  # diffusers runs the ControlNets once per step, on "cond"
        else:
            contributions = []
            steps = self._steps()
            for plan in self.plans:
                scale = plan.entry.conditioning_scale * plan.entry.keep(self.step, steps)
                if scale == 0:  # diffusers adds 0 * r: the same as adding nothing
                    continue
                if plan.controlnet is not None:
                    control = control_for_rows(plan.rows, layout)
                    contributions.append(
                        _Contribution(
                            *self.adapter.controlnet_residuals(
                                plan.controlnet, control, scale, inputs, plan.entry, layout
                            )
                        )
                    )
                else:
                    static = {g: [r * scale for r in rs] for g, rs in plan.static.items()}
                    contributions.append(_Contribution(static, False))
            if not uncond:
                self._cond = (self.step, contributions)
        existing = self.adapter.existing_residuals(inputs)
        if existing is not None:
            contributions = [_Contribution(*existing), *contributions]
        if not contributions:
            return inputs
        residuals, repeat = combine(self.adapter, contributions)
        return {**inputs, **self.adapter.residual_kwargs(residuals, repeat)}


def control_for_rows(rows: dict[str, torch.Tensor], layout: BatchLayout) -> torch.Tensor:
    """The control for every row of a denoiser call: each branch's rows get that branch's control
    (batch 1 expanded, or one row per image); rows of another kind of call take the conditional one."""
    parts = []
    for branch, span in layout.rows:
        control = rows.get(branch, rows["cond"])
        parts.append(fit_batch(control, span.stop - span.start))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@contextlib.contextmanager
def no_new_attributes(module: torch.nn.Module | None) -> Iterator[None]:
    """Remove instance attributes that ``module``'s submodules gain inside the block: some VAEs
    (Qwen-Image's) create their feature caches as attributes on first encode, and preparing a control
    image must leave the pipeline's modules as it found them."""
    if module is None:
        yield
        return
    before = {name: set(sub.__dict__) for name, sub in module.named_modules()}
    try:
        yield
    finally:
        for name, sub in module.named_modules():
            for attribute in set(sub.__dict__) - before.get(name, set(sub.__dict__)):
                delattr(sub, attribute)


def per_branch_control(
    control: torch.Tensor, images: int | None, split_cfg: bool, where: str
) -> dict[str, torch.Tensor]:
    """A prepared control as one tensor per CFG branch, checked against the call's image count.

    Batch 1 applies to every image, a batch of ``images`` gives one per image; with ``split_cfg``
    (batched CFG running), a batch of ``2 * images`` is ``[uncond, cond]``, one sample per CFG half as
    diffusers' SD3 ControlNet pipeline draws them. Anything else is refused, counted in images."""
    batch = control.shape[0]
    if images is not None and split_cfg and batch == 2 * images and batch != 1:
        return {"uncond": control[:images], "cond": control[images:]}
    if images is not None and batch not in (1, images):
        raise CacheError(
            f"{where}: the control has batch {batch}, the call makes {images} image(s); give 1 (it "
            f"applies to every image) or {images} (one per image)"
        )
    return {"cond": control, "uncond": control}


def check_sizes(plans: list[_Plan], template: str | None, target: InjectionTarget, kwargs: dict) -> None:
    """Raise CacheError when a control conditioning or static residual does not fit the call's size."""
    size = _call_size(target.pipe, target.adapter, kwargs)
    if size is None:
        return
    height, width = size
    adapter = target.adapter
    for plan in plans:
        if plan.controlnet is not None and plan.entry.prepare:
            channels = plan.control.shape[1] if plan.control.ndim == 4 else "C"
            checks = [("control image", plan.control, (channels, height, width))]
        elif plan.controlnet is not None:
            expected = adapter.control_shape(plan.controlnet, height, width)
            checks = [("control conditioning", plan.control, expected)]
        else:
            checks = [
                (f"residual {group}/{k}", tensor, adapter.residual_shape(group, k, height, width))
                for group, tensors in plan.static.items()
                for k, tensor in enumerate(tensors)
            ]
        for what, tensor, expected in checks:
            if tuple(tensor.shape[1:]) != tuple(expected):
                raise CacheError(
                    f"residual cache from template {template!r}, entry {plan.index}: the {what} has shape "
                    f"{tuple(tensor.shape)}; a {height}x{width} call needs "
                    f"(batch, {', '.join(map(str, expected))}). Prepare it at the call's size"
                )


def combine(adapter: Any, contributions: list[_Contribution]) -> tuple[Residuals, bool]:
    """Sum contributions per block, in order (diffusers' MultiControlNet sum).

    Per group: when every contribution has the same residual count and repeat flag, residuals are
    summed index by index (MultiControlNet exactly); otherwise each is first mapped to the
    denoiser's blocks with ``adapter.residual_index`` and the result has one residual per block.
    """
    if len(contributions) == 1:
        return contributions[0]
    slots = adapter.residual_slots()
    out: Residuals = {}
    repeat = False
    groups = list(dict.fromkeys(g for c in contributions for g in c.residuals))
    for group in groups:
        parts = [(c.residuals[group], c.repeat) for c in contributions if c.residuals.get(group)]
        if len({(len(rs), rep) for rs, rep in parts}) == 1:
            out[group] = [_fold(list(column)) for column in zip(*(rs for rs, _ in parts), strict=True)]
            repeat = repeat or parts[0][1]
            continue
        memo: dict[tuple[int, ...], torch.Tensor] = {}
        per_block = []
        for block in range(slots[group].blocks):
            key = tuple(adapter.residual_index(group, block, len(rs), rep) for rs, rep in parts)
            if key not in memo:
                memo[key] = _fold([rs[i] for (rs, _), i in zip(parts, key, strict=True)])
            per_block.append(memo[key])
        out[group] = per_block  # one per block: the identity under every interval rule
    return out, repeat


def _fold(tensors: list[torch.Tensor]) -> torch.Tensor:
    total = tensors[0]
    for tensor in tensors[1:]:
        total = total + tensor
    return total


def _call_size(pipe: Any, adapter: Any, kwargs: dict[str, Any]) -> tuple[int, int] | None:
    """The (height, width) a call will generate at, when it can be told before the call."""
    height, width = kwargs.get("height"), kwargs.get("width")
    if height is None or width is None:
        if "image" in kwargs:  # image-to-image: the size comes from the input image
            return None
        if hasattr(adapter, "default_size"):
            default_height, default_width = adapter.default_size()
        elif getattr(pipe, "default_sample_size", None) and getattr(pipe, "vae_scale_factor", None):
            default_height = default_width = pipe.default_sample_size * pipe.vae_scale_factor
        else:
            return None
        height, width = height or default_height, width or default_width
    return int(height), int(width)


# --------------------------------------------------------------------------- carrier


class ResidualCarrier(Carrier):
    name = "residual"
    cache_class = ResidualCache

    def __init__(self) -> None:
        self._loaded: dict[tuple[str, str, str, str], torch.nn.Module] = {}

    def supports(self, adapter: Any) -> bool:
        return adapter_supports_residuals(adapter)

    def merge_caches(self, caches: list[ResidualCache]) -> ResidualCache:
        entries: list[ResidualEntry] = []
        control: dict[str, torch.Tensor] = {}
        residuals: dict[str, torch.Tensor] = {}
        for cache in caches:
            offset = len(entries)
            entries.extend(cache.entries)
            control.update({str(int(i) + offset): t for i, t in cache.control.items()})
            for key, tensor in cache.residuals.items():
                index, rest = key.split("/", 1)
                residuals[f"{int(index) + offset}/{rest}"] = tensor
        return ResidualCache(
            entries=entries, control=control, residuals=residuals, template=joined_template_names(caches)
        )

    def injection(self, cache: ResidualCache, target: InjectionTarget) -> ResidualInjection:
        adapter = target.adapter
        if not adapter_supports_residuals(adapter):
            raise UnsupportedError(f"backbone {adapter.name!r} does not support the residual carrier")
        if target.branch != "cond":
            raise UnsupportedError(
                f"residual cache from template {cache.template!r} was given as a negative template: "
                "ControlNet residuals apply to the whole denoiser call (both CFG branches, as in "
                "diffusers' ControlNet pipelines); pass it in `templates`"
            )
        slots = adapter.residual_slots()
        images = target.images
        plans = []
        for i, entry in enumerate(cache.entries):
            where = f"residual cache from template {cache.template!r}, entry {i}"
            for option in ("guess_mode", "control_mode"):
                if getattr(entry, option) not in (None, False) and option not in adapter.residual_options:
                    raise CacheError(f"{where}: {option} does not apply to backbone {adapter.name!r}")
            if entry.has_controlnet:
                controlnet = entry.module
                if controlnet is None:
                    controlnet = self._load(entry.controlnet, adapter)
                control = cache.control[str(i)]
                plans.append(self._controlnet_plan(i, entry, controlnet, control, target, where, images))
            else:
                static = cache.static_residuals(i)
                _check_counts({g: len(rs) for g, rs in static.items()}, slots, adapter, where)
                cast = {"device": adapter.device, "dtype": adapter.dtype}
                for group, tensors in static.items():
                    for k, tensor in enumerate(tensors):
                        expected = tuple(adapter.residual_shape(group, k, None, None))
                        got = tuple(tensor.shape[1:])
                        fits = len(got) == len(expected) and all(
                            e in (None, g) for e, g in zip(expected, got, strict=True)
                        )
                        if not fits:
                            shown = ", ".join("?" if e is None else str(e) for e in expected)
                            raise CacheError(
                                f"{where}: residual {group}/{k} has shape {tuple(tensor.shape)}; backbone "
                                f"{adapter.name!r} expects (batch, {shown})"
                            )
                static = {g: [t.to(**cast) for t in rs] for g, rs in static.items()}
                plans.append(_Plan(i, entry, None, None, static))
        call_kwargs = getattr(target.call, "kwargs", None)  # when the host passes the call's kwargs
        if isinstance(call_kwargs, dict):
            check_sizes(plans, cache.template, target, call_kwargs)
        plans = [self._prepared(plan, target, images, call_kwargs or {}, cache.template) for plan in plans]
        return ResidualInjection(plans, cache.template, target, images)

    @staticmethod
    def _prepared(
        plan: _Plan, target: InjectionTarget, images: int | None, kwargs: dict, template: str | None
    ) -> _Plan:
        """The plan with its control per CFG branch for this call (a ``prepare`` entry's image prepared
        as diffusers' ControlNet pipeline of the family prepares it, for the call's images and CFG)."""
        if plan.controlnet is None:
            return plan
        adapter = target.adapter
        where = f"residual cache from template {template!r}, entry {plan.index}"
        cfg = bool(adapter.cfg_active(kwargs)) if kwargs else False
        split_cfg = adapter.cfg_style == "batched" and cfg
        control = plan.control
        if not plan.entry.prepare:
            return plan._replace(rows=per_branch_control(control, images, split_cfg, where))
        per_image = per_branch_control(control, images, False, where)["cond"]  # checks the image count
        size = _call_size(target.pipe, adapter, kwargs) or tuple(control.shape[-2:])
        with torch.no_grad(), no_new_attributes(getattr(target.pipe, "vae", None)):
            prepared = adapter.prepare_control_image(
                per_image,
                controlnet=plan.controlnet,
                height=size[0],
                width=size[1],
                generator=plan.entry.sampler(),
                batch_size=images or per_image.shape[0],
                do_classifier_free_guidance=cfg,
                guess_mode=plan.entry.guess_mode,
            )
        param = next(plan.controlnet.parameters())
        prepared = prepared.to(device=param.device, dtype=param.dtype)
        return plan._replace(rows=per_branch_control(prepared, images or per_image.shape[0], cfg, where))

    def _controlnet_plan(
        self,
        index: int,
        entry: ResidualEntry,
        controlnet: torch.nn.Module,
        control: torch.Tensor,
        target: InjectionTarget,
        where: str,
        images: int | None = None,
    ) -> _Plan:
        adapter = target.adapter
        classes = {k.__name__ for k in type(controlnet).__mro__}
        if not classes & set(adapter.controlnet_classes):
            raise CacheError(
                f"{where}: holds a {type(controlnet).__name__}; backbone {adapter.name!r} runs "
                f"{' or '.join(adapter.controlnet_classes)}"
            )
        try:
            counts = adapter.check_controlnet(controlnet, entry)
        except CacheError as exc:
            raise CacheError(f"{where}: {exc}") from None
        _check_counts(counts, adapter.residual_slots(), adapter, where)
        param = next(controlnet.parameters())
        if param.device != adapter.device:
            raise CacheError(
                f"{where}: the ControlNet is on {param.device}, the denoiser on {adapter.device}; "
                "move it there"
            )
        if entry.prepare:  # an image: the adapter casts it as diffusers does when preparing it
            return _Plan(index, entry, controlnet, control.to(device=param.device), None)
        return _Plan(index, entry, controlnet, control.to(device=param.device, dtype=param.dtype), None)

    def _load(self, path: str, adapter: Any) -> torch.nn.Module:
        import diffusers

        klass = getattr(diffusers, adapter.controlnet_classes[0])
        key = (path, klass.__name__, str(adapter.device), str(adapter.dtype))
        if key not in self._loaded:
            try:
                module = klass.from_pretrained(path, torch_dtype=adapter.dtype, use_safetensors=True)
            except Exception as exc:
                raise CacheError(
                    f"residual cache: cannot load {klass.__name__} from {path!r}: {exc}"
                ) from exc
            self._loaded[key] = module.to(adapter.device).eval()
        return self._loaded[key]


def _check_counts(counts: dict[str, int], slots: dict[str, ResidualSlots], adapter: Any, where: str) -> None:
    unknown = sorted(set(counts) - set(slots))
    if unknown:
        raise CacheError(
            f"{where}: residual groups {unknown} do not exist in backbone {adapter.name!r}; "
            f"its groups are {list(slots)}"
        )
    for group, slot in slots.items():
        count = counts.get(group, 0)
        if slot.required and count == 0:
            raise CacheError(f"{where}: backbone {adapter.name!r} needs residuals for group {group!r}")
        if count == 0:
            continue
        if slot.exact and count != slot.blocks:
            raise CacheError(
                f"{where}: {count} residuals for group {group!r}; backbone {adapter.name!r} has exactly "
                f"{slot.blocks} there"
            )
        if count > slot.blocks:
            raise CacheError(
                f"{where}: {count} residuals for group {group!r}, but backbone {adapter.name!r} has only "
                f"{slot.blocks} blocks there (diffusers would silently drop the extra ones)"
            )


def interval_index(blocks: int, count: int, block: int) -> int:
    """FLUX.1/Qwen-Image rule: block ``block`` of ``blocks`` gets residual ``block // ceil(blocks/count)``."""
    return block // int(math.ceil(blocks / count))
