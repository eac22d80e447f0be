"""Helpers shared by the reliability tests (named so that no other tests/ module shadows it)."""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

REPORT_ENV = "DT_RELIABILITY_REPORT"
SCALE_ENV = "DT_RELIABILITY_SCALE"


def scaled(n: int) -> int:
    """``n`` times ``DT_RELIABILITY_SCALE`` (the CI-sized counts are the defaults)."""
    return max(1, round(n * float(os.environ.get(SCALE_ENV, "1") or 1)))


class Tally(Counter):
    """What the suite counted; written as JSON to ``$DT_RELIABILITY_REPORT`` at the end of the session."""

    def write(self) -> None:
        path = os.environ.get(REPORT_ENV)
        if not path:
            return
        previous = json.loads(Path(path).read_text()) if Path(path).exists() else {}
        for key, value in self.items():
            previous[key] = previous.get(key, 0) + value
        Path(path).write_text(json.dumps(dict(sorted(previous.items())), indent=2) + "\n")


@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def global_state_problems() -> list[str]:
    """Process-wide state a call may touch besides the pipeline: all must be back at rest."""
    from diffusers.models import attention_processor
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from diffusion_templates import attention
    from diffusion_templates.context import CURRENT_CALL

    problems = []
    if attention.installed_points():
        problems.append(f"attention points still installed: {[p.name for p in attention.installed_points()]}")
    if attention_processor.F is not torch.nn.functional:
        problems.append("diffusers' attention_processor.F is still the proxy")
    wrapped = [
        n for n, fn in _AttentionBackendRegistry._backends.items() if getattr(fn, "_dt_wrapper", False)
    ]
    if wrapped:
        problems.append(f"attention backends still wrapped: {wrapped}")
    if CURRENT_CALL.get() is not None:
        problems.append("CURRENT_CALL is still set in this thread")
    return problems


def attention_linears(denoiser: torch.nn.Module) -> list[str]:
    """Paths of the Linear projections inside attention modules (safe LoRA targets on every family)."""
    return [
        name
        for name, module in denoiser.named_modules()
        if isinstance(module, torch.nn.Linear) and any(p.startswith("attn") for p in name.split("."))
    ]


def call_kwargs(
    family: str, *, seed: int = 0, steps: int = 2, size: int = 32, **extra: Any
) -> dict[str, Any]:
    """A fast deterministic CFG call returning latents."""
    from diffusion_templates.testing.tiny import tiny_call_kwargs

    kwargs = tiny_call_kwargs(family, cfg=True, steps=steps, size=size, seed=seed, output_type="latent")
    kwargs.setdefault("prompt", "a red circle")
    kwargs.update(extra)
    return kwargs


def build(family: str):
    """A tiny pipeline of ``family``, warmed up once (lazily created diffusers/transformers state)."""
    from diffusion_templates.testing.tiny import TINY_PIPELINES

    pipe = TINY_PIPELINES[family].build()
    pipe.set_progress_bar_config(disable=True)
    pipe(**call_kwargs(family, steps=1))
    return pipe
