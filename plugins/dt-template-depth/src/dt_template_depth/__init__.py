"""Structure control for Diffusion Templates: a depth map drives a diffusers ControlNet (residual carrier).

``pip install`` this package and the template ``depth`` is available to
``diffusion_templates.TemplatePipeline`` and listed by ``dt list``.
"""

from .inputs import DepthInputs
from .template import REFUSED, DepthTemplate

__version__ = "0.1.0"
__all__ = ["REFUSED", "DepthInputs", "DepthTemplate"]
