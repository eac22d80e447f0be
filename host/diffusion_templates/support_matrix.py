"""Which carrier works on which backbone, generated from the installed adapters and carriers.

``python -m diffusion_templates.support_matrix docs/support-matrix.md`` rewrites the published
table; a test regenerates it and compares, so the document cannot drift from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .plugins import PluginHost


def support_matrix(host: PluginHost | None = None) -> dict[str, dict[str, str | None]]:
    """carrier -> backbone -> None when supported, else the adapter's reason (or "not supported")."""
    host = host or PluginHost()
    matrix: dict[str, dict[str, str | None]] = {}
    adapters = {name: host.get("backbone", name) for name in host.names("backbone")}
    for carrier_name in host.names("carrier"):
        carrier = host.get("carrier", carrier_name)
        row = matrix.setdefault(carrier_name, {})
        for backbone, adapter in adapters.items():
            if carrier.supports(adapter):
                row[backbone] = None
            else:
                row[backbone] = getattr(adapter, "unsupported_reasons", {}).get(carrier_name, "not supported")
    return matrix


def render(host: PluginHost | None = None) -> str:
    host = host or PluginHost()
    matrix = support_matrix(host)
    backbones = host.names("backbone")
    lines = [
        "# Support matrix",
        "",
        "Generated from the installed backbone adapters and carriers by",
        "`python -m diffusion_templates.support_matrix docs/support-matrix.md` (`nox -s support-matrix`);",
        "a test regenerates it and compares. Do not edit by hand.",
        "",
        "| carrier | " + " | ".join(backbones) + " |",
        "|---|" + "---|" * len(backbones),
    ]
    notes = []
    for carrier, row in matrix.items():
        cells = []
        for backbone in backbones:
            reason = row[backbone]
            if reason is None:
                cells.append("yes")
            else:
                notes.append(f"- `{carrier}` on `{backbone}`: {reason}")
                cells.append(f"no [{len(notes)}]")
        lines.append(f"| `{carrier}` | " + " | ".join(cells) + " |")
    lines += ["", "Backbones:", ""]
    for backbone in backbones:
        adapter = host.get("backbone", backbone)
        lines.append(f"- `{backbone}`: {', '.join(adapter.denoiser_classes)} "
                     f"({', '.join(adapter.pipeline_classes)}); CFG {adapter.cfg_style}")
    if notes:
        lines += ["", "Not supported:", ""]
        lines += [f"{i}. {note[2:]}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if argv:
        Path(argv[0]).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
