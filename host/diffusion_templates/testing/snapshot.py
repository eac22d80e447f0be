"""Everything about a pipeline that a call must leave as it was, and a readable comparison.

Used by the test suite and the SDK's conformance kit. A snapshot holds, for every ``nn.Module``
component: each parameter and buffer (cloned), and per submodule its instance ``__dict__`` keys,
its attention processor object, its torch hook dicts and its diffusers hook registry; plus the
scheduler's config. Comparing two snapshots names the first difference.
"""

from __future__ import annotations

from typing import Any

import torch

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


def _module_record(module: torch.nn.Module) -> dict[str, Any]:
    registry = module.__dict__.get("_diffusers_hook")
    return {
        "type": type(module),
        "dict_keys": tuple(sorted(module.__dict__)),
        "forward": module.__dict__.get("forward"),
        "processor": module.__dict__.get("processor"),
        "torch_hooks": {name: tuple(getattr(module, name, {}).items()) for name in _TORCH_HOOK_DICTS},
        "diffusers_hooks": None if registry is None else tuple(registry._hook_order),
    }


def pipeline_state(pipe: Any) -> dict[str, Any]:
    """Snapshot of ``pipe`` (a diffusers pipeline, or a bare ``nn.Module``)."""
    components = {"module": pipe} if isinstance(pipe, torch.nn.Module) else dict(pipe.components)
    state: dict[str, Any] = {}
    for cname, comp in components.items():
        if isinstance(comp, torch.nn.Module):
            for pname, tensor in comp.state_dict(keep_vars=True).items():
                state[f"{cname}.tensor.{pname}"] = tensor.detach().clone()
            for mname, module in comp.named_modules():
                state[f"{cname}.module.{mname or '<root>'}"] = _module_record(module)
        elif hasattr(comp, "config") and cname == "scheduler":
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
