"""Age control for Diffusion Templates: a slider in text-embedding space (embedding carrier, additive).

``pip install`` this package and the template ``age`` is available to
``diffusion_templates.TemplatePipeline`` and listed by ``dt list``.
"""

from .inputs import DEFAULT_OLD, DEFAULT_YOUNG, AgeInputs, PromptKwargs
from .template import AgeTemplate

__version__ = "0.1.0"
__all__ = ["DEFAULT_OLD", "DEFAULT_YOUNG", "AgeInputs", "AgeTemplate", "PromptKwargs"]
