"""``sharpness``: a Diffusion Templates plugin that steers a generation's fine detail, soft to crisp.

``pip install`` this package and the template ``sharpness`` is available to
``diffusion_templates.TemplatePipeline`` and listed by ``dt list``::

    pipe(prompt="...", templates=[{"template": "sharpness", "scale": 0.8}])
"""

from .inputs import SharpnessInputs
from .template import HF_RANGE, HF_TYPICAL, SharpnessTemplate, hf_scale, hf_target

__version__ = "0.1.0"
__all__ = ["HF_RANGE", "HF_TYPICAL", "SharpnessInputs", "SharpnessTemplate", "hf_scale", "hf_target"]
