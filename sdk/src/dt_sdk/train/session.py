"""What a training run works with: the frozen base pipeline, the template plugin, the data rows.

Also the guards that keep the base pipeline as it was: :func:`frozen` (``requires_grad`` and
train/eval flags restored exactly) and :func:`checkpointing` (diffusers' gradient checkpointing on
for the block only, each module's attributes put back).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from diffusion_templates import EncodeContext, TemplateModel, TemplatePipeline
from diffusion_templates.installed import entries
from diffusion_templates.plugins import PluginHost, default_host

from .config import TrainConfig, TrainError
from .data import Row, data_fingerprint, read_rows
from .objectives import Objective, objective_for


@dataclass
class Session:
    cfg: TrainConfig
    pipe: Any
    call_kwargs: dict[str, Any]
    plugins: PluginHost
    plugin: Any
    tpipe: TemplatePipeline
    objective: Objective
    context: EncodeContext
    rows: list[Row]
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def adapter(self) -> Any:
        return self.tpipe.adapter

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.tpipe.adapter.denoiser

    def new_model(self) -> TemplateModel:
        """The model to train: ``plugin.new_model(context, **model_config)`` or the ``init`` weights.

        Seeded with ``cfg.seed`` (the caller's RNG state is left alone), so two runs start equal.
        """
        new_model = getattr(self.plugin, "new_model", None)
        if new_model is None:
            raise TrainError(
                f"template {self.cfg.template!r} has no trainable Template model: its plugin "
                f"{type(self.plugin).__name__} has no new_model(context, **model_config) method"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            model = new_model(self.context, **self.cfg.model_config)
        if not isinstance(model, TemplateModel):
            raise TrainError(
                f"template {self.cfg.template!r}: new_model returned {type(model).__name__}, "
                "not a TemplateModel"
            )
        if self.cfg.init is not None:
            model = type(model).from_pretrained(self.cfg.init)
        return model.to(self.adapter.device)

    def fingerprint(self) -> dict[str, str]:
        """What stage 1's results depend on, hashed per part (the part that differs is named)."""
        cfg = self.cfg
        info = self.plugins.info("template", cfg.template)
        template = {
            "name": cfg.template,
            "distribution": getattr(info, "distribution", None),
            "version": getattr(info, "version", None),
            "plugin": f"{type(self.plugin).__module__}.{type(self.plugin).__qualname__}",
            "inputs": self.plugin.Inputs.model_json_schema(),
            "model_config": cfg.model_config,
        }
        encoding = {
            "objective": type(self.objective).__name__,
            "size": cfg.size,
            "call_kwargs": {k: self.call_kwargs.get(k) for k in sorted(self.call_kwargs)},
        }
        return {
            "base model": base_fingerprint(self.pipe, cfg.base),
            "template": _digest(template),
            "data set": data_fingerprint(cfg.data, self.rows),
            "encoding settings": _digest(encoding),
        }


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=repr).encode()).hexdigest()


def base_fingerprint(pipe: Any, base: str | None) -> str:
    """Component classes and configs, and the weight files' sizes and dates when loaded from a folder."""
    parts: dict[str, Any] = {"base": base, "pipeline": type(pipe).__name__}
    for name, comp in sorted(pipe.components.items()):
        config = getattr(comp, "config", None)
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        elif config is not None:
            config = dict(config)
        parts[name] = {"class": type(comp).__name__, "config": config}
        if isinstance(comp, torch.nn.Module):
            parts[name]["dtype"] = str(next(comp.parameters(), torch.empty(0)).dtype)
    folder = Path(str(getattr(pipe, "name_or_path", "") or ""))
    if folder.is_dir():
        parts["files"] = sorted(
            (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*.safetensors")
        )
    return _digest(parts)


def load_base(base: str | None, *, allow_pickle: bool = False) -> tuple[Any, dict[str, Any]]:
    """The pipeline and its call arguments: ``base`` (a diffusers folder or hub id) or the embedded model.

    ``base`` is read from safetensors only unless ``allow_pickle`` (``dt train --allow-pickle``): a folder
    of pickle weights is refused by name before anything loads (``diffusion_templates.pickle_guard``).
    """
    from diffusion_templates.demo import load_base as demo_load_base

    embedded = [e for e in entries(["diffusion_templates.base_models"]) if e.problem is None]
    if base is None and not embedded:
        raise TrainError("no base model: pass --base FOLDER (no embedded base model is installed)")
    loaded = demo_load_base(base, allow_pickle=allow_pickle)
    return loaded.pipe, dict(loaded.call_kwargs)


def open_session(
    cfg: TrainConfig,
    *,
    pipe: Any = None,
    call_kwargs: dict[str, Any] | None = None,
    plugins: PluginHost | None = None,
    device: torch.device | str | None = None,
) -> Session:
    """Resolve everything a run needs; all errors about the configuration and the data happen here."""
    plugins = plugins or default_host()
    plugin = plugins.get("template", cfg.template)
    if getattr(plugin, "new_model", None) is None:
        raise TrainError(
            f"template {cfg.template!r} has no trainable Template model: its plugin "
            f"{type(plugin).__name__} has no new_model(context, **model_config) method"
        )
    rows = read_rows(cfg.data, cfg.template, plugin.Inputs, cfg.max_rows)  # bad data fails before loading
    if pipe is None:
        pipe, base_kwargs = load_base(cfg.base, allow_pickle=cfg.allow_pickle)
        if device is not None:
            pipe.to(device)
        call_kwargs = {**base_kwargs, **(call_kwargs or {})}
    call_kwargs = {**(call_kwargs or {}), **cfg.call_kwargs}
    tpipe = TemplatePipeline(pipe, plugins=plugins, store=None)
    tpipe._check_backbone(cfg.template, plugin)  # the same check a pipeline call makes
    objective = objective_for(pipe, tpipe.adapter, call_kwargs)
    context = EncodeContext(pipe=pipe, adapter=tpipe.adapter, template=cfg.template)
    return Session(cfg, pipe, call_kwargs, plugins, plugin, tpipe, objective, context, rows)


@contextlib.contextmanager
def frozen(pipe: Any) -> Iterator[None]:
    """Every parameter of the pipeline's modules frozen for the block; flags restored exactly after."""
    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    grads = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    modes = [(m, m.training) for c in modules for m in c.modules()]
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag


def _context_preserving_checkpoint(module: torch.nn.Module, *args: Any) -> Any:
    """diffusers' default checkpoint function, recomputing inside the forward's context variables.

    Injections act through context variables (the current call, extra K/V). Backward may recompute
    a block on another thread (CUDA's autograd threads), where they are unset: the recomputed
    activations would then differ from the forward's. Running both in one copied context fixes that.
    """
    ctx = contextvars.copy_context()

    def run(*inner: Any) -> Any:
        return ctx.run(module.__call__, *inner)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


@contextlib.contextmanager
def checkpointing(denoiser: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """diffusers' gradient checkpointing on ``denoiser`` for the block; every module's attributes after
    are what they were (``enable_gradient_checkpointing`` adds ``_gradient_checkpointing_func``)."""
    if not enabled:
        yield
        return
    if not getattr(denoiser, "_supports_gradient_checkpointing", False):
        raise TrainError(f"{type(denoiser).__name__} does not support gradient checkpointing")
    missing = object()
    names = ("gradient_checkpointing", "_gradient_checkpointing_func")
    saved = [
        (m, [m.__dict__.get(name, missing) for name in names])
        for m in denoiser.modules()
        if hasattr(m, "gradient_checkpointing")
    ]
    try:
        denoiser.enable_gradient_checkpointing(_context_preserving_checkpoint)
        yield
    finally:
        for module, values in saved:
            for name, value in zip(names, values, strict=True):
                if value is missing:
                    module.__dict__.pop(name, None)
                else:
                    module.__dict__[name] = value
