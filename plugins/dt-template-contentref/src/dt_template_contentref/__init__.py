"""dt-template-contentref: content reference with reference-image keys/values, attenuated by a scale.

A Diffusion Templates plugin: ``pip install`` this package and the template ``contentref`` is
available to ``diffusion_templates.TemplatePipeline`` and listed by ``dt list``.
"""

from .inputs import ContentRefInputs
from .model import ContentRefModel
from .template import ContentRefTemplate

__version__ = "0.1.0"
__all__ = ["ContentRefInputs", "ContentRefModel", "ContentRefTemplate"]
