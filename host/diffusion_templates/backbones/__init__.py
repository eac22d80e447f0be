"""Backbone adapters: one small module per diffusers model family.

An adapter tells carriers where a denoiser's attention layers are, their head count and head dim,
how the pipeline runs classifier-free guidance, and which carriers it supports. Adapters are
plugins (entry point group ``diffusion_templates.backbones``).
"""

from .base import AttentionLayer, BackboneAdapter

__all__ = ["AttentionLayer", "BackboneAdapter"]
