"""Input schema of the ``age`` template: where on the young-old axis, and the anchors that define it.

    {"template": "age", "age": 0.8}
    {"template": "age", "age": 0.2, "young_prompt": "a photo of a teenager",
     "old_prompt": "a photo of a middle-aged person", "strength": 1.5}

Every constraint is checked before anything runs; a bad value fails with a ``TemplateInputError``
naming the template and the field.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from diffusion_templates import TemplateInputs
from diffusion_templates.errors import check_window

DEFAULT_YOUNG = "a photo of a young child"
DEFAULT_OLD = "a photo of an elderly person"


class PromptKwargs(BaseModel):
    """Text-encoding arguments of the call, for encoding the anchors the same way as the prompt."""

    model_config = ConfigDict(extra="forbid")

    max_sequence_length: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="The call's max_sequence_length (T5 / Qwen / Qwen3 encoders), when not the "
        "pipeline's default.",
    )
    text_encoder_out_layers: list[int] | None = Field(
        None,
        min_length=1,
        max_length=16,
        description="FLUX.2 only: the call's text_encoder_out_layers, when not the pipeline's default.",
    )
    clip_skip: int | None = Field(None, ge=0, le=24, description="SD3 / SDXL: the call's clip_skip.")

    def as_call_kwargs(self) -> dict:
        out = {k: v for k, v in self.model_dump().items() if v is not None}
        if "text_encoder_out_layers" in out:
            out["text_encoder_out_layers"] = tuple(out["text_encoder_out_layers"])
        return out


class AgeInputs(TemplateInputs):
    age: float = Field(
        ...,
        ge=0.0,
        le=1.0,
        description="Target age on the anchors' axis: 0 = the young anchor's end (child), 1 = the old "
        "anchor's end (elderly). The midpoint of young_age and old_age (0.5 by default) leaves the prompt "
        "unchanged.",
    )
    young_prompt: str = Field(
        DEFAULT_YOUNG,
        min_length=1,
        max_length=1000,
        description="Anchor prompt of the young end.",
    )
    old_prompt: str = Field(
        DEFAULT_OLD, min_length=1, max_length=1000, description="Anchor prompt of the old end."
    )
    young_age: float = Field(0.0, ge=0.0, le=1.0, description="The age the young anchor stands for, 0 to 1.")
    old_age: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="The age the old anchor stands for, 0 to 1; must exceed young_age.",
    )
    strength: float = Field(
        1.0,
        ge=0.0,
        le=4.0,
        description="Multiplier of the shift: at strength 1 an age at an anchor moves the prompt embeddings "
        "by half the anchors' difference (from their midpoint to that anchor), 0 to 4.",
    )
    pooled: bool = Field(
        True,
        description="Also shift the pooled prompt embedding, where the backbone has one (FLUX.1, SD3, SDXL).",
    )
    prompt_kwargs: PromptKwargs = Field(
        default_factory=PromptKwargs,
        description="The call's text-encoding arguments (max_sequence_length, text_encoder_out_layers, "
        "clip_skip), so that the anchors are encoded like the prompt.",
    )

    @field_validator("young_prompt", "old_prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("an anchor prompt must not be blank")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> AgeInputs:
        # Both fields, whichever the user gave (a validator on ``old_age`` skips its default).
        check_window(
            self, "old_age ({end}) must be larger than young_age ({start})", start="young_age", end="old_age"
        )
        return self

    @field_validator("old_prompt")
    @classmethod
    def _distinct(cls, value: str, info: ValidationInfo) -> str:
        if value == info.data.get("young_prompt"):
            raise ValueError("old_prompt equals young_prompt: the anchors define no direction")
        return value

    @property
    def coefficient(self) -> float:
        """How far along ``old - young`` (the anchors' embedding difference) the prompt moves."""
        middle = (self.young_age + self.old_age) / 2
        return self.strength * (self.age - middle) / (self.old_age - self.young_age)
