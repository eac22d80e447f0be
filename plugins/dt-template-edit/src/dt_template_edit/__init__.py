"""dt-template-edit: image editing with reference-image keys/values (Flux2KleinKVPipeline's mechanism).

A Diffusion Templates plugin: ``pip install`` this package and the template ``edit`` is available to
``diffusion_templates.TemplatePipeline`` and listed by ``dt list``.
"""

from .inputs import EditInputs
from .model import EditModel
from .template import EditTemplate

__version__ = "0.1.0"
__all__ = ["EditInputs", "EditModel", "EditTemplate"]
