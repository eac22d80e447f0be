"""``TrainConfig``: everything one training run depends on (validated with pydantic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter
from pydantic.dataclasses import dataclass


class TrainError(Exception):
    """A problem with the run's configuration, data set or stage-1 cache (shown as a one-line error)."""


class StaleCacheError(TrainError):
    """The stage-1 cache on disk was made for another base model, template or data set."""


# A pydantic *dataclass*, not a BaseModel: ``model_config`` (the Template model's constructor
# arguments) is a field name the contract fixes, and BaseModel reserves it for its own settings.
@dataclass(config=ConfigDict(extra="forbid", validate_assignment=True))
class TrainConfig:
    """One training run of a Template model against a frozen diffusers backbone."""

    template: str
    data: Path
    """Folder holding ``samples.jsonl`` (rows ``{"image", "caption", "inputs"}``) and the files it names."""
    out: Path
    """Where ``save_pretrained`` writes the model (``config.json`` + safetensors) and ``training.json``."""
    base: str | None = None
    """A diffusers folder or hub id; ``None``: the embedded default base model
    (the ``diffusion_templates.base_models`` entry point, as ``dt demo`` uses)."""
    allow_pickle: bool = False
    """Also load ``base`` from pickle weights (``.bin``); by default only safetensors are read."""
    steps: int = Field(100, ge=1)
    batch: int = Field(4, ge=1)
    lr: float = Field(1e-4, gt=0)
    seed: int = 0
    gradient_checkpointing: bool = False
    cache_dir: Path | None = None
    """Stage-1 cache folder; default ``<out>.stage1`` next to ``out``."""
    model_config: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the plugin's ``new_model(context, **model_config)``."""
    init: Path | None = None
    """Start from weights saved with ``save_pretrained`` instead of a new model."""
    log_every: int = Field(10, ge=0)
    save_every: int = Field(0, ge=0)
    """Also save the model every N steps (0: only at the end)."""
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of samples trained with the empty caption (the pipeline's CFG negative)."""
    max_rows: int | None = Field(None, ge=1)
    size: int | None = Field(None, ge=8)
    """Resize every image to ``size`` x ``size`` first; ``None``: images keep their size (equal per batch)."""
    timesteps: Literal["logit_normal", "uniform"] = "logit_normal"
    max_grad_norm: float | None = Field(1.0, gt=0)
    call_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Pipeline call arguments used to encode captions (``max_sequence_length``,
    ``text_encoder_out_layers``...); over the base model's own defaults."""

    @property
    def stage1_dir(self) -> Path:
        return self.cache_dir or self.out.parent / f"{self.out.name}.stage1"

    def as_json(self) -> dict[str, Any]:
        return TypeAdapter(TrainConfig).dump_python(self, mode="json")
