"""Aesthetic alignment for Diffusion Templates: a bank of LoRA files merged exactly (lora carrier).

``pip install`` this package and the template ``aesthetic`` is available to
``diffusion_templates.TemplatePipeline`` and listed by ``dt list``.
"""

from .inputs import AestheticInputs, LoraSpec
from .lora_files import LoraFileError, detect_format, load_lora
from .template import AestheticTemplate

__version__ = "0.1.0"
__all__ = ["AestheticInputs", "AestheticTemplate", "LoraFileError", "LoraSpec", "detect_format", "load_lora"]
