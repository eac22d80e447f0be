"""templates reach only the conditional CFG branch, negative_templates only the unconditional one."""

from __future__ import annotations

import pytest
import torch

from diffusion_templates import TemplatePipeline
from helpers import FAMILIES, run


def record_branch_outputs(pipe, family, tp=None, **kwargs):
    """Denoiser outputs of one call per CFG branch: sequential pipelines call cond then uncond
    in each step; batched ones (SD3, SDXL) compute [uncond, cond] halves in one call."""
    outputs = {"cond": [], "uncond": []}
    order = []
    adapter = TemplatePipeline(pipe).adapter

    def hook(module, args, kw, output):
        output = output[0].detach().clone()
        if adapter.cfg_style == "batched":
            n = output.shape[0] // 2
            outputs["uncond"].append(output[:n])
            outputs["cond"].append(output[n:])
            return
        branch = "cond" if len(order) % 2 == 0 else "uncond"
        order.append(branch)
        outputs[branch].append(output)

    handle = adapter.denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        run(tp or pipe, family, **kwargs)
    finally:
        handle.remove()
    return outputs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("carrier", ["kv", "lora"])
def test_branches_see_only_their_own_caches(family, carrier, tiny_pipes):
    pipe = tiny_pipes(family)
    tp = TemplatePipeline(pipe)
    first = next(iter(tp.adapter.attention_layers().values()))
    lora_target = next(
        f"{first.path}.{n}" for n, m in first.module.named_modules() if isinstance(m, torch.nn.Linear)
    )
    template = (
        {"template": "test-kv", "scale": 1.0}
        if carrier == "kv"
        else {"template": "test-lora", "targets": [lora_target]}
    )
    bare = record_branch_outputs(pipe, family)
    # Step 0 has identical inputs in every call: compare the first denoiser output of each branch.
    positive = record_branch_outputs(pipe, family, tp, templates=[template])
    assert not torch.equal(positive["cond"][0], bare["cond"][0])
    assert torch.equal(positive["uncond"][0], bare["uncond"][0])
    negative = record_branch_outputs(pipe, family, tp, negative_templates=[template])
    assert torch.equal(negative["cond"][0], bare["cond"][0])
    assert not torch.equal(negative["uncond"][0], bare["uncond"][0])


def test_negative_templates_without_cfg_warn(flux2_pipe):
    tp = TemplatePipeline(flux2_pipe)
    with pytest.warns(UserWarning, match="no unconditional"):
        run(tp, "flux2_klein", cfg=False, negative_templates=[{"template": "test-kv"}])


@pytest.mark.parametrize(("positive_length", "negative_length", "seed"), [(7, 2, 4), (3, 5, 1), (1, 1, 9)])
def test_positive_and_negative_kv_of_different_lengths(flux2_pipe, positive_length, negative_length, seed):
    """Each branch gets its own cache, whatever the two lengths: the conditional branch's outputs
    are those of the positive template alone, the unconditional branch's those of the negative
    alone, and both differ from the bare call's (a kv carrier that did nothing would leave them equal)."""
    tp = TemplatePipeline(flux2_pipe)
    positive = {"template": "test-kv", "length": positive_length}
    negative = {"template": "test-kv", "length": negative_length, "seed": seed}
    bare = record_branch_outputs(flux2_pipe, "flux2_klein")
    both = record_branch_outputs(
        flux2_pipe, "flux2_klein", tp, templates=[positive], negative_templates=[negative]
    )
    alone_pos = record_branch_outputs(flux2_pipe, "flux2_klein", tp, templates=[positive])
    alone_neg = record_branch_outputs(flux2_pipe, "flux2_klein", tp, negative_templates=[negative])
    assert all(torch.isfinite(t).all() for t in both["cond"] + both["uncond"])
    # Step 0: the same latents in every call, so each branch's first output depends only on its cache.
    assert torch.equal(both["cond"][0], alone_pos["cond"][0])
    assert torch.equal(both["uncond"][0], alone_neg["uncond"][0])
    assert not torch.equal(both["cond"][0], bare["cond"][0])
    assert not torch.equal(both["uncond"][0], bare["uncond"][0])
