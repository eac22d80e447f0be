"""Everything about a pipeline that a call must leave as it was, and a readable comparison.

Used by the test suite and the SDK's conformance kit. A snapshot holds, for every ``nn.Module``
component: each parameter and buffer (cloned) and which of them require grad, and per submodule its
``training`` flag, its instance ``__dict__`` keys, its attention processor object, its torch hook
dicts and its diffusers hook registry; the config of every component that has one (the scheduler's,
the models'); which object each component is; and torch's global module hooks. That is everything
``guard.py`` checks around a plugin's encode. Comparing two snapshots names the first difference.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin
from torch.nn.modules import module as torch_module

_TORCH_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called",
    "_global_forward_hooks_with_kwargs",
)


def _module_record(module: torch.nn.Module) -> dict[str, Any]:
    registry = module.__dict__.get("_diffusers_hook")
    return {
        "type": type(module),
        "training": module.training,
        "dict_keys": tuple(sorted(module.__dict__)),
        "forward": module.__dict__.get("forward"),
        "processor": module.__dict__.get("processor"),
        "torch_hooks": {name: tuple(getattr(module, name, {}).items()) for name in _TORCH_HOOK_DICTS},
        "diffusers_hooks": None if registry is None else tuple(registry._hook_order),
    }


def pipeline_state(pipe: Any) -> dict[str, Any]:
    """Snapshot of ``pipe`` (a diffusers pipeline, or a bare ``nn.Module``)."""
    components = {"module": pipe} if isinstance(pipe, torch.nn.Module) else dict(pipe.components)
    state: dict[str, Any] = {
        "pipeline.components": {name: (type(comp), id(comp)) for name, comp in components.items()},
        "torch.global_hooks": {
            name: tuple(getattr(torch_module, name).items()) for name in _GLOBAL_HOOK_DICTS
        },
    }
    for cname, comp in components.items():
        if isinstance(comp, torch.nn.Module):
            tensors = comp.state_dict(keep_vars=True)
            for pname, tensor in tensors.items():
                state[f"{cname}.tensor.{pname}"] = tensor.detach().clone()
            state[f"{cname}.requires_grad"] = sorted(p for p, t in tensors.items() if t.requires_grad)
            for mname, module in comp.named_modules():
                state[f"{cname}.module.{mname or '<root>'}"] = _module_record(module)
        if isinstance(comp, ConfigMixin):
            state[f"{cname}.config"] = dict(comp.config)
    return state


def state_differences(before: dict[str, Any], after: dict[str, Any], limit: int = 10) -> list[str]:
    """Human-readable differences between two snapshots (empty when bit-identical)."""
    diffs = [f"{k}: appeared" for k in after.keys() - before.keys()]
    diffs += [f"{k}: disappeared" for k in before.keys() - after.keys()]
    for key in before.keys() & after.keys():
        a, b = before[key], after[key]
        if isinstance(a, torch.Tensor):
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                diffs.append(f"{key}: tensor changed")
        elif isinstance(a, dict) and "type" in a:
            for field in a:
                if field == "processor" or field == "forward":
                    same = a[field] is b[field]
                else:
                    same = a[field] == b[field]
                if not same:
                    diffs.append(f"{key}: {field} changed ({a[field]!r} -> {b[field]!r})")
        elif a != b:
            diffs.append(f"{key}: changed")
    return sorted(diffs)[:limit]


def assert_pipeline_unchanged(before: dict[str, Any], pipe: Any) -> None:
    diffs = state_differences(before, pipeline_state(pipe))
    if diffs:
        raise AssertionError("pipeline changed:\n  " + "\n  ".join(diffs))
