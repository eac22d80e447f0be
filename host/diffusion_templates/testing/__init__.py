"""Test helpers for Diffusion Templates: tiny offline pipelines with random weights."""
