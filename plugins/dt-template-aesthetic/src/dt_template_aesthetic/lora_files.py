"""LoRA files (diffusers, PEFT or kohya format) read into a :class:`LoraCache` for one backbone.

Formats, told apart by their keys:

* **diffusers**: ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight`` (``unet.`` on SDXL), the
  format of ``save_lora_weights``; the older ``...lora.down.weight`` spelling too. Alphas come from the
  file's ``lora_adapter_metadata`` (diffusers ``save_lora_weights(..., *_lora_adapter_metadata=)``) or
  ``.alpha`` keys; without either the scaling is 1, as diffusers assumes.
* **PEFT**: ``base_model.model.<module>.lora_A.weight``, PEFT's ``save_pretrained`` of a wrapped
  denoiser; ``lora_alpha`` (and ``alpha_pattern``, ``use_rslora``) come from the ``adapter_config.json``
  next to the file, or from the spec's ``alpha``.
* **kohya** (sd-scripts, ComfyUI, ...): ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` and
  ``.alpha``. Converted with diffusers' own loader of the backbone family (``<Family>LoraLoaderMixin
  .lora_state_dict``, i.e. ``diffusers.loaders.lora_conversion_utils``: ``_convert_kohya_flux_lora_to_
  diffusers`` for FLUX.1, ``_convert_kohya_flux2_lora_to_diffusers`` for FLUX.2,
  ``_convert_non_diffusers_qwen_lora_to_diffusers`` for Qwen-Image, ``_maybe_map_sgm_blocks_to_diffusers``
  + ``_convert_non_diffusers_lora_to_diffusers`` for SDXL). diffusers has no kohya converter for SD3:
  there, and for kohya files a family converter does not recognise, ``lora_unet_`` /
  ``lora_transformer_`` names are matched against the denoiser's own Linear module names (kohya's naming
  rule: the module path with dots replaced by underscores), which is unambiguous or refused.

Alphas are exact: each ``.alpha`` (kohya, or a diffusers file's) multiplies its module's up factor by
``alpha / rank`` before conversion (the converters then see ``alpha == rank``, scale 1), so the cache
holds ``B * alpha / r`` and ``A`` and the delta is the one the file means, whatever names the converter
gives the module. Per-module alphas from PEFT or diffusers metadata stay in the cache's ``scaling``.

Refused, with the reason (or dropped with ``skip_unsupported``): text-encoder layers (the lora carrier
patches the denoiser only) and non-Linear layers (convolution LoRAs, e.g. SDXL LoCon). Always refused:
LyCORIS (LoKr/LoHa) and DoRA files, LoRA biases, and files whose modules the denoiser does not have.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from diffusion_templates import CacheError, LoraCache, TemplateError
from diffusion_templates.limits import check_finite

#: diffusers' LoRA loader of each backbone family (its ``lora_state_dict`` converts foreign formats).
MIXINS = {
    "flux": "FluxLoraLoaderMixin",
    "flux2": "Flux2LoraLoaderMixin",
    "sd3": "SD3LoraLoaderMixin",
    "qwen_image": "QwenImageLoraLoaderMixin",
    "sdxl": "StableDiffusionXLLoraLoaderMixin",
}
#: Families whose diffusers loader converts kohya files (SD3's has no kohya converter).
KOHYA_CONVERTERS = frozenset({"flux", "flux2", "qwen_image", "sdxl"})
TEXT_ENCODER_PREFIXES = ("text_encoder", "text_encoder_2", "text_encoder_3", "te", "te1", "te2")
_ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
_LYCORIS = (".lokr_", ".hada_", ".lora_mid.", ".oft_", ".boft_", ".lokr_w", ".hada_w")
_DORA = ("dora_scale", "lora_magnitude_vector")
_LORA_SUFFIX = re.compile(r"[._]lora[._]")  # where a key's module name ends
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(\.[^.]+)?\.(?P<what>weight|bias)$")


class LoraFileError(TemplateError, ValueError):
    """A LoRA file cannot be read, converted or applied to this backbone."""


@dataclass
class LoraFile:
    """The tensors and metadata of one LoRA safetensors file (nothing is unpickled)."""

    path: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    adapter_config: dict[str, Any] | None = None  # PEFT adapter_config.json beside the file

    @classmethod
    def read(cls, path: str) -> LoraFile:
        try:
            with safe_open(path, framework="pt", device="cpu") as handle:
                metadata = dict(handle.metadata() or {})
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except Exception as exc:
            raise LoraFileError(f"LoRA file {path!r} is not a readable safetensors file: {exc}") from None
        config = None
        config_path = Path(path).with_name("adapter_config.json")
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(), parse_constant=_refuse_constant)
            except (OSError, ValueError) as exc:
                raise LoraFileError(f"{config_path}: not readable JSON ({exc})") from None
        if not tensors:
            raise LoraFileError(f"LoRA file {path!r} holds no tensors")
        return cls(path, tensors, metadata, config)

    def diffusers_metadata(self, prefix: str) -> dict[str, Any] | None:
        """The LoraConfig fields diffusers stored for component ``prefix`` (``transformer``/``unet``)."""
        raw = self.metadata.get(_ADAPTER_METADATA)
        if not raw:
            return None
        try:
            packed = json.loads(raw, parse_constant=_refuse_constant)
        except ValueError as exc:
            raise LoraFileError(
                f"LoRA file {self.path!r}: its {_ADAPTER_METADATA} metadata is not JSON ({exc})"
            ) from None
        fields = {k[len(prefix) + 1 :]: v for k, v in packed.items() if k.startswith(f"{prefix}.")}
        return fields or None


def _refuse_constant(name: str) -> Any:
    """Python's json accepts NaN and Infinity (not JSON): an alpha of NaN would poison every output."""
    raise ValueError(f"{name} is not a JSON number (values must be finite)")


def _check_tensors(tensors: Mapping[str, torch.Tensor]) -> None:
    """Every floating tensor of the file finite, before alphas are folded (inf x 0 would hide it)."""
    floating = {k: t for k, t in tensors.items() if t.is_floating_point()}
    try:
        check_finite("the file", floating)
    except CacheError as exc:
        raise LoraFileError(str(exc).removeprefix("the file: ")) from None


def detect_format(keys: list[str]) -> str:
    """'peft', 'kohya' or 'diffusers'; LyCORIS and DoRA files are refused."""
    if any(any(marker in key for marker in _LYCORIS) for key in keys):
        raise LoraFileError(
            "LyCORIS (LoKr/LoHa/...) layers are not low-rank A/B pairs; the lora carrier applies "
            "LoRA files only"
        )
    if any(any(marker in key for marker in _DORA) for key in keys):
        raise LoraFileError(
            "DoRA files (magnitude vectors) are not supported: the lora carrier adds B(A(x)) only"
        )
    if any(key.startswith("base_model.model.") for key in keys):
        return "peft"
    if any(key.endswith((".lora_down.weight", ".lora_up.weight")) for key in keys):
        return "kohya"
    return "diffusers"


def _fold_alphas(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Multiply each module's up factor by ``alpha / rank``; its alpha becomes the rank (``keep``) or goes.

    After this, every converter sees scale 1, and the cache's delta is exactly the file's delta whatever
    name a converter gives the module.
    """
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith(".alpha")]:
        base = key[: -len(".alpha")]
        pairs = [(base + d, base + u) for d, u in (
            (".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
            (".lora.down.weight", ".lora.up.weight"), (".down.weight", ".up.weight"),
        )]  # fmt: skip
        found = next(((d, u) for d, u in pairs if d in out and u in out), None)
        if found is None:
            raise LoraFileError(f"alpha {key!r} belongs to no LoRA pair in the file")
        down_key, up_key = found
        rank = out[down_key].shape[0]
        scale = float(out[key]) / rank
        up = out[up_key]
        out[up_key] = (up.float() * scale).to(up.dtype)
        if keep:
            out[key] = torch.tensor(float(rank))
        else:
            del out[key]
    return out


def _diffusers_convert(tensors: dict[str, torch.Tensor], adapter: Any) -> dict[str, torch.Tensor]:
    """What ``<Family>LoraLoaderMixin.lora_state_dict`` (``load_lora_weights``' first step) makes of it."""
    import diffusers.loaders.lora_pipeline as lora_pipeline

    mixin = getattr(lora_pipeline, MIXINS[adapter.name])
    extra = {"unet_config": adapter.denoiser.config} if adapter.name == "sdxl" else {}
    out = mixin.lora_state_dict(dict(tensors), **extra)
    return dict(out[0] if isinstance(out, tuple) else out)


def _kohya_by_module_names(tensors: dict[str, torch.Tensor], adapter: Any) -> dict[str, torch.Tensor]:
    """kohya keys whose names are the denoiser's own module paths with dots as underscores."""
    names: dict[str, str | None] = {}
    for path, module in adapter.denoiser.named_modules():
        if isinstance(module, torch.nn.Linear):
            flat = path.replace(".", "_")
            names[flat] = None if flat in names else path  # None: two modules flatten alike
    out, unknown = {}, []
    for key, tensor in tensors.items():
        base, _, suffix = key.partition(".")
        for head in ("lora_unet_", "lora_transformer_"):
            if base.startswith(head):
                base = base[len(head) :]
                break
        else:
            if base.startswith(("lora_te", "lora_te1_", "lora_te2_", "lora_te3_")):
                out[f"text_encoder.{key}"] = tensor  # refused or skipped later
                continue
        path = names.get(base)
        if path is None:
            unknown.append(key)
            continue
        suffix = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(suffix, suffix)
        out[f"{adapter.lora_prefix}.{path}.{suffix}"] = tensor
    if unknown:
        raise LoraFileError(
            f"kohya keys that name no Linear module of the {type(adapter.denoiser).__name__} (backbone "
            f"{adapter.name!r}): {', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}"
        )
    return out


def _to_diffusers_keys(lora: LoraFile, fmt: str, adapter: Any) -> dict[str, torch.Tensor]:
    """``<component>.<module>.lora_A/B.weight`` keys (component = the adapter's prefix or a text encoder)."""
    prefix = adapter.lora_prefix
    tensors = lora.tensors
    if fmt == "peft":
        tensors = {
            f"{prefix}.{k[len('base_model.model.') :]}" if k.startswith("base_model.model.") else k: v
            for k, v in tensors.items()
        }
        return _fold_alphas(tensors, keep=False)
    tensors = _fold_alphas(tensors, keep=fmt == "kohya")
    if adapter.name not in MIXINS:  # a third-party backbone: diffusers/PEFT keys only
        if fmt == "kohya":
            return _kohya_by_module_names(tensors, adapter)
        return tensors
    if fmt == "kohya" and adapter.name not in KOHYA_CONVERTERS:
        return _kohya_by_module_names(tensors, adapter)
    try:
        converted = _diffusers_convert(tensors, adapter)
    except Exception as exc:
        if fmt != "kohya":
            raise LoraFileError(f"diffusers cannot read it as a {adapter.name} LoRA: {exc}") from None
        try:  # a kohya file named after the diffusers modules, which the family converter does not expect
            return _kohya_by_module_names(tensors, adapter)
        except LoraFileError as own:
            raise LoraFileError(f"diffusers' {adapter.name} kohya converter failed ({exc}); {own}") from None
    return {k: v for k, v in converted.items() if not k.endswith(".alpha")}


def _split(tensors: dict[str, torch.Tensor], adapter: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Denoiser keys (with the adapter's prefix) and the names of text-encoder modules."""
    prefix = adapter.lora_prefix
    denoiser, text, unknown = {}, set(), []
    linear_paths = None
    for key, tensor in tensors.items():
        if key.endswith(".alpha"):  # folded into the up factors already (the value is the rank now)
            continue
        head = key.split(".", 1)[0]
        if head == prefix:
            denoiser[key] = tensor
        elif head in TEXT_ENCODER_PREFIXES:
            text.add(_LORA_SUFFIX.split(key, 1)[0])
        else:  # keys without a component prefix, relative to the denoiser
            if linear_paths is None:
                linear_paths = {p for p, _ in adapter.denoiser.named_modules()}
            module = _LORA_SUFFIX.split(key, 1)[0]
            if module in linear_paths:
                denoiser[f"{prefix}.{key}"] = tensor
            else:
                unknown.append(key)
    if unknown:
        raise LoraFileError(
            f"keys that belong to no component of the pipeline: {', '.join(unknown[:4])}"
            f"{' ...' if len(unknown) > 4 else ''} (is it a LoRA for another model?)"
        )
    if denoiser and not any(_PEFT_KEY.match(k) for k in denoiser):
        from diffusers.utils import convert_unet_state_dict_to_peft

        plain = {k[len(prefix) + 1 :]: v for k, v in denoiser.items()}
        denoiser = {f"{prefix}.{k}": v for k, v in convert_unet_state_dict_to_peft(plain).items()}
    return denoiser, sorted(text)


def _config_alphas(config: Mapping[str, Any], modules: Mapping[str, int]) -> dict[str, float]:
    """Per-module alpha for ``LoraCache.from_state_dict`` (which scales by alpha / rank) from a PEFT
    LoraConfig dict (``lora_alpha``, ``alpha_pattern``, ``use_rslora``), as PEFT would scale."""
    if config.get("use_dora"):
        raise LoraFileError("DoRA adapters (use_dora) are not supported: the lora carrier adds B(A(x)) only")
    default = config.get("lora_alpha")
    patterns = dict(config.get("alpha_pattern") or {})
    rslora = bool(config.get("use_rslora"))
    out = {}
    for module, rank in modules.items():
        alpha = next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", module)), default)
        if alpha is None:
            continue
        out[module] = float(alpha) * (math.sqrt(rank) if rslora else 1.0)  # rsLoRA: alpha / sqrt(r)
    return out


def load_lora(
    path: str,
    adapter: Any,
    *,
    weight: float = 1.0,
    alpha: float | None = None,
    skip_unsupported: bool = False,
    template: str | None = None,
) -> tuple[LoraCache | None, list[str]]:
    """One LoRA file as a cache for ``adapter``'s denoiser, scaled by ``weight``; and what was skipped.

    The cache is ``None`` when every layer was skipped.
    """
    lora = LoraFile.read(path)
    try:
        _check_tensors(lora.tensors)
        fmt = detect_format(list(lora.tensors))
        tensors, text = _split(_to_diffusers_keys(lora, fmt, adapter), adapter)
        prefix = adapter.lora_prefix
        skipped = [f"text encoder: {m}" for m in text]
        if text and not skip_unsupported:
            raise LoraFileError(
                f"it has {len(text)} text-encoder layers (e.g. {text[0]!r}); the lora carrier patches the "
                "denoiser only. Pass skip_unsupported=True to apply the denoiser layers alone"
            )
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            match = _PEFT_KEY.match(key)
            if match is None:
                raise LoraFileError(f"key {key!r} is not a LoRA A/B weight")
            if match["what"] == "bias":
                raise LoraFileError(f"LoRA biases ({key!r}) are not supported by the lora carrier")
            module = match["module"][len(prefix) + 1 :]
            pairs.setdefault(module, {})[match["kind"]] = tensor
        state: dict[str, torch.Tensor] = {}
        denoiser = adapter.denoiser
        for module, pair in pairs.items():
            if set(pair) != {"lora_A", "lora_B"}:
                raise LoraFileError(
                    f"module {module!r} lacks its {'lora_B' if 'lora_A' in pair else 'lora_A'}"
                )
            try:
                target = denoiser.get_submodule(module)
            except AttributeError:
                raise LoraFileError(
                    f"it targets {module!r}, which the {type(denoiser).__name__} of backbone "
                    f"{adapter.name!r} does not have (is it a LoRA for another model?)"
                ) from None
            if isinstance(target, torch.nn.Linear) and (pair["lora_A"].ndim, pair["lora_B"].ndim) != (2, 2):
                raise LoraFileError(  # malformed, not unsupported: skip_unsupported does not drop it
                    f"module {module!r} (a Linear) has LoRA factors of shapes {tuple(pair['lora_A'].shape)} "
                    f"and {tuple(pair['lora_B'].shape)}; a Linear's lora_A is (r, in) and its lora_B "
                    "(out, r), both 2-D"
                )
            if not isinstance(target, torch.nn.Linear):
                if not skip_unsupported:
                    raise LoraFileError(
                        f"layer {module!r} is a {type(target).__name__}; the lora carrier applies LoRAs to "
                        "torch.nn.Linear layers only. Pass skip_unsupported=True to leave it out"
                    )
                skipped.append(f"{type(target).__name__}: {module}")
                continue
            state[f"{prefix}.{module}.lora_A.weight"] = pair["lora_A"]
            state[f"{prefix}.{module}.lora_B.weight"] = pair["lora_B"]
        if not state:
            if skipped:
                return None, skipped
            raise LoraFileError("it holds no LoRA layers for the denoiser")
        ranks = {
            m[len(prefix) + 1 : -len(".lora_A.weight")]: t.shape[0]
            for m, t in state.items()
            if m.endswith(".lora_A.weight")
        }
        config = lora.adapter_config if fmt == "peft" else lora.diffusers_metadata(prefix)
        if alpha is not None:
            if any(k.endswith(".alpha") for k in lora.tensors):
                raise LoraFileError("the file stores its own alphas; leave the spec's alpha out")
            config = {**(config or {}), "lora_alpha": float(alpha)}
        alphas = _config_alphas(config, ranks) if config else {}
        cache = LoraCache.from_state_dict(
            state, prefix=prefix, scale=weight, alphas=alphas, template=template
        )
        cache.check_values()  # DT_MAX_LORA_MAGNITUDE, named after the file rather than at call time
    except (LoraFileError, CacheError) as exc:
        raise LoraFileError(f"template {template!r}: LoRA file {path!r} ({adapter.name}): {exc}") from None
    return cache, skipped
