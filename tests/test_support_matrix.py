"""docs/support-matrix.md is what the installed adapters and carriers report."""

from __future__ import annotations

from pathlib import Path

from diffusion_templates.plugins import PluginHost
from diffusion_templates.support_matrix import render, support_matrix

DOC = Path(__file__).parents[1] / "docs" / "support-matrix.md"


def test_published_matrix_matches_the_adapters():
    assert DOC.read_text() == render(), (
        "docs/support-matrix.md is stale: run "
        "`python -m diffusion_templates.support_matrix docs/support-matrix.md`"
    )


def test_every_backbone_supports_kv_and_lora_and_every_gap_has_a_reason():
    host = PluginHost()
    matrix = support_matrix(host)
    assert all(reason is None for reason in matrix["kv"].values())
    assert all(reason is None for reason in matrix["lora"].values())
    for backbone in host.names("backbone"):
        adapter = host.get("backbone", backbone)
        for carrier, reason in ((c, row[backbone]) for c, row in matrix.items()):
            if reason is not None:
                assert carrier in adapter.unsupported_reasons, f"{backbone} lacks a reason for {carrier}"
