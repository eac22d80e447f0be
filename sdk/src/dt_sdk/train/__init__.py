"""``dt train``: train a Template model against a frozen diffusers backbone with its own objective.

::

    from dt_sdk.train import TrainConfig, precompute, train

    cfg = TrainConfig(template="my-glow", data="data/", out="weights/my-glow", steps=1000, batch=8, lr=1e-4)
    precompute(cfg)            # stage 1 (optional: train runs it when its cache is missing)
    record = train(cfg)        # stage 2; train(cfg, stages="one") does both per batch, no cache

Also ``dt train ...``, ``python -m dt_sdk.train ...`` and ``accelerate launch -m dt_sdk.train ...``.
Importing this package does not import torch; the functions do.
"""

from __future__ import annotations

from typing import Any

from .config import StaleCacheError, TrainConfig, TrainError

__all__ = ["StaleCacheError", "TrainConfig", "TrainError", "precompute", "train"]


def precompute(cfg: TrainConfig, **kwargs: Any):
    """Stage 1: see :func:`dt_sdk.train.stages.precompute`."""
    from .stages import precompute as run

    return run(cfg, **kwargs)


def train(cfg: TrainConfig, **kwargs: Any) -> dict[str, Any]:
    """Stage 2 (and stage 1 when needed): see :func:`dt_sdk.train.stages.train`."""
    from .stages import train as run

    return run(cfg, **kwargs)
