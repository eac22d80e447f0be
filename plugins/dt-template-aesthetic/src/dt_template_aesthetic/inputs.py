"""Input schema of the ``aesthetic`` template: a bank of LoRA files, their weights, how they merge.

    {"template": "aesthetic",
     "loras": [{"path": "film-look.safetensors", "weight": 0.8}, "soft-light.safetensors"],
     "merge": "sum"}

Every constraint is checked before anything is read; a bad value fails with a ``TemplateInputError``
naming the template and the field (``loras.0.path``...).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from diffusion_templates import TemplateInputs
from diffusion_templates.store import file_digest

#: Most LoRA files one spec may merge.
MAX_LORAS = 16
#: File names diffusers (``save_lora_weights``) and PEFT (``save_pretrained``) give a LoRA in a folder.
KNOWN_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")


def lora_file(value: str) -> str:
    """The LoRA's safetensors file: ``value`` itself, or the one LoRA file inside the folder ``value``."""
    try:
        path = Path(value).expanduser()
        is_dir, is_file = path.is_dir(), path.is_file()
    except (OSError, RuntimeError, ValueError) as exc:  # unknown ~user, NUL bytes, a name too long
        raise ValueError(f"{value!r} is not a usable path ({exc})") from None
    if is_dir:
        known = [path / name for name in KNOWN_NAMES if (path / name).is_file()]
        files = known or sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            found = ", ".join(p.name for p in files) or "none"
            raise ValueError(
                f"folder {value!r} must hold exactly one LoRA .safetensors file (found: {found})"
            )
        path = files[0]
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{value!r} is not a .safetensors file; LoRA weights are read from safetensors only "
            "(pickled .bin/.pt/.ckpt files are never loaded)"
        )
    if not (path.is_file() if is_dir else is_file):
        raise ValueError(f"no LoRA file at {value!r}")
    return str(path)


class LoraSpec(BaseModel):
    """One LoRA of the bank."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        ...,
        description="A LoRA .safetensors file (diffusers, PEFT or kohya format), or a folder holding one "
        "(pytorch_lora_weights.safetensors / adapter_model.safetensors; a PEFT adapter_config.json beside it "
        "gives lora_alpha).",
    )
    weight: float = Field(
        1.0,
        ge=-4.0,
        le=4.0,
        description="Multiplier of this LoRA's delta (diffusers' set_adapters weight), -4 to 4.",
    )
    alpha: float | None = Field(
        None,
        gt=0.0,
        le=65536.0,
        description="Network alpha when the file stores none (scaling = alpha / rank); default: the file's "
        "own alphas or adapter_config.json, else scaling 1 as diffusers assumes.",
    )

    signature: str | None = Field(
        None,
        description="Set from the file at validation (the SHA-256 of its content; any value given is "
        "replaced): computed caches are keyed by it, so an edited file is read again, even one rewritten "
        "with its old size and modification time.",
    )

    @model_validator(mode="after")
    def _signature(self) -> LoraSpec:
        try:
            digest = file_digest(self.path)
        except OSError as exc:  # vanished or replaced by a FIFO/device since the path was checked
            raise ValueError(f"cannot read LoRA file {self.path!r} ({exc})") from None
        self.__dict__["signature"] = f"sha256:{digest}"
        return self

    @field_validator("path", mode="before")
    @classmethod
    def _path(cls, value: Any) -> str:
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"expected a file or folder path, got {type(value).__name__}")
        return lora_file(os.fspath(value))


class AestheticInputs(TemplateInputs):
    loras: list[LoraSpec] = Field(
        ...,
        min_length=1,
        max_length=MAX_LORAS,
        description=f"The LoRA bank: 1 to {MAX_LORAS} entries, each a path or {{path, weight, alpha}}.",
    )
    merge: Literal["sum", "mean"] = Field(
        "sum",
        description="How the weighted deltas combine: 'sum' adds them (diffusers' set_adapters), "
        "'mean' divides each weight by the number of LoRAs.",
    )
    skip_unsupported: bool = Field(
        False,
        description="Drop LoRA layers the lora carrier cannot apply (text-encoder layers, convolution "
        "layers) instead of refusing the file. The carrier patches the denoiser's Linear layers only.",
    )

    @field_validator("loras", mode="before")
    @classmethod
    def _entries(cls, value: Any) -> Any:
        if isinstance(value, str):  # one path (e.g. from the command line)
            value = [value]
        if isinstance(value, (list, tuple)):
            return [{"path": v} if isinstance(v, str) else v for v in value]
        return value
