"""dt-base-shapes: a tiny FLUX.2-architecture text-to-image model trained on synthetic shapes.

The committed weights (``weights/``, a standard diffusers folder) load with plain
``Flux2KleinPipeline.from_pretrained``; :func:`load_base` is the ``diffusion_templates.base_models``
entry point that ``dt demo`` and ``dt generate`` use as their default base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"

WEIGHTS = Path(__file__).parent / "weights"
DESCRIPTION = f"dt-base-shapes {__version__}: a tiny FLUX.2-architecture model trained on synthetic shapes"
# Base (not guidance-distilled) model: real CFG against the empty caption, so negative templates work.
CALL_KWARGS: dict[str, Any] = {
    "num_inference_steps": 20,
    "height": 64,
    "width": 64,
    "guidance_scale": 4.0,
    "max_sequence_length": 32,
    "text_encoder_out_layers": (1, 2),
}
# Held-out captions (combinations never in the training split; the tests check).
PROMPTS = [
    "a large red circle in the center on a green background",
    "a large yellow triangle in the center on a blue background",
    "a large green star in the center on a black background",
    "a large red circle in the top left on a white and green background",
    "a small red circle in the bottom right on a purple background",
]


def load_pipeline(folder: str | Path | None = None, *, allow_pickle: bool = False):
    """``Flux2KleinPipeline.from_pretrained`` on the committed weights (or ``folder``), CPU, eval mode.

    Safetensors only unless ``allow_pickle``: a folder with pickle weights is refused before
    anything is loaded (``diffusion_templates.pickle_guard``).
    """
    from diffusers import Flux2KleinPipeline
    from diffusers.utils import is_accelerate_available
    from diffusion_templates.pickle_guard import from_pretrained

    load = Flux2KleinPipeline.from_pretrained
    # Low-memory loading only with accelerate: asking for it without prints a warning on every load.
    pipe = from_pretrained(
        load, str(folder or WEIGHTS), allow_pickle=allow_pickle, low_cpu_mem_usage=is_accelerate_available()
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_base():
    """The ``diffusion_templates.base_models`` entry point: the pipeline and how to call it."""
    from diffusion_templates.demo import BaseModel

    return BaseModel(load_pipeline(), dict(CALL_KWARGS), DESCRIPTION, list(PROMPTS))
