"""Carriers: how a Template cache reaches the base model. One module per carrier.

A carrier is a plugin (entry point group ``diffusion_templates.carriers``) implementing the
``merge`` and ``inject`` hooks, usually by subclassing :class:`~.base.Carrier`.
"""

from .base import Carrier

__all__ = ["Carrier"]
