"""Run the reliability suite at a larger scale and write its numbers into docs/reliability.md.

    python tests/reliability/report.py [--scale 5] [--doc docs/reliability.md] [-- extra pytest args]

(``nox -s reliability`` runs this.) The suite runs with ``DT_RELIABILITY_SCALE`` (the randomized
loops' sizes times ``--scale``) and ``DT_RELIABILITY_REPORT`` (where the tests write their counts);
the counts become the table between the ``reliability-table`` markers of the document. The table
is written only when the suite passed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
START, END = "<!-- reliability-table:start -->", "<!-- reliability-table:end -->"


def _by(counts: dict[str, int], prefix: str) -> str:
    items = [
        (k[len(prefix) :], v)
        for k, v in counts.items()
        if k.startswith(prefix) and "." not in k[len(prefix) :]
    ]
    return ", ".join(f"{name} {value}" for name, value in sorted(items))


def render(counts: dict[str, int], summary: str, scale: float) -> str:
    c = counts.get
    faults, survived = c("faults.injected", 0), c("faults.survived_bit_identical", 0)
    concurrent = sum(v for k, v in counts.items() if k.startswith("concurrency.") and k.count(".") == 1)
    fuzz_inputs, fuzz_files = c("fuzz.inputs", 0), c("fuzz.cache_files", 0)
    rows = [
        (
            "Faults injected",
            faults,
            f"sites: {_by(counts, 'faults.site.')}; KeyboardInterrupt {c('faults.keyboard_interrupt', 0)}; "
            f"families: {_by(counts, 'faults.family.')}; "
            f"calls with carriers: {_by(counts, 'faults.carrier.')}",
        ),
        (
            "Calls survived bit-identical",
            f"{survived} / {faults}",
            "`pipeline_state` identical (weights, buffers, processors, hooks, scheduler config), attention "
            "wrappers and context variables at rest, and the next call bit-equal to a freshly built "
            f"pipeline's (next call: {_by(counts, 'faults.next_call.')})",
        ),
        (
            "Concurrent calls checked",
            concurrent,
            f"8 threads: one shared TemplatePipeline {c('concurrency.shared_template_pipeline', 0)}, "
            f"`from_pipe` pipelines {c('concurrency.from_pipe_pipelines', 0)}, bare calls beside templated "
            f"calls {c('concurrency.bare_beside_templated', 0)}; every carrier beside bare calls "
            f"{c('concurrency.every_carrier_beside_bare', 0)}; pipelines sharing only a scheduler "
            f"{c('concurrency.shared_scheduler_pipelines', 0)}; every result bit-equal to the same call "
            "made alone",
        ),
        (
            "Fuzz cases run",
            fuzz_inputs + fuzz_files,
            f"template inputs {fuzz_inputs} over {c('fuzz.templates', 0)} templates "
            f"({_by(counts, 'fuzz.inputs.')}); cache files {fuzz_files} "
            f"(accepted {c('fuzz.cache_files.accepted', 0)}, "
            f"CacheError {c('fuzz.cache_files.rejected', 0)}); "
            "nothing else raised",
        ),
        (
            "Malformed files rejected",
            c("files.malformed_rejected", 0) + c("fuzz.cache_files.rejected", 0),
            f"{c('files.malformed_rejected', 0)} hand-made (lying, truncated, absurd headers, wrong "
            "shapes/dtypes, NaN/Inf, bad metadata, pickles, model folders with code or .bin weights) + "
            f"{c('fuzz.cache_files.rejected', 0)} fuzzed; {c('files.host_sources_scanned', 0)} host source "
            "files scanned: no pickle, no `torch.load` without `weights_only=True`",
        ),
        ("Oversized template sets refused", c("bounds.refused", 0), "merged K/V length and LoRA rank bounds"),
        (
            "Cache-store attacks (cases)",
            c("cases.test_store_attacks", 0),
            "hostile and garbage indexes, foreign files, FIFOs, symlinks, flipped or truncated bytes, "
            "interrupted writes, keys across `PYTHONHASHSEED`, fine-tunes, in-place weight edits, rewritten "
            "LoRA files: each a miss, nothing outside the store's own entries read or deleted",
        ),
        (
            "Out-of-bound values refused (cases)",
            c("cases.test_value_bounds", 0),
            "NaN/Inf/huge tensors and numbers from encodes, cache files, LoRA files and metadata, masks "
            "outside [0, 1], start/end windows: refused before denoising, pipeline unchanged",
        ),
        (
            "Broken distributions isolated (cases)",
            c("cases.test_discovery_attacks", 0),
            "no `Name`, undecodable METADATA, bad entry points, `sys.exit`/KeyboardInterrupt at import: "
            "reported for that plugin, `dt list`/`dt doctor` print their report, a real Ctrl-C propagates",
        ),
        (
            "Encode side effects refused (cases)",
            c("cases.test_encode_side_effects", 0),
            f"a plugin's encode that trains, hooks, swaps processors, rewrites configs or weights: refused "
            f"naming the plugin ({c('encode_guard.refused_and_undone', 0)} changes undone first)",
        ),
        (
            "Plugin failures isolated",
            c("plugins.failures_isolated", 0),
            f"each named plugin and distribution, the other plugins unaffected; "
            f"{c('plugins.env_checks', 0)} allow/deny env-var checks",
        ),
    ]
    lines = [
        START,
        f"Generated by `tests/reliability/report.py` (what `nox -s reliability` runs), scale {scale:g}: "
        f"{summary}  ",
        f"Python {platform.python_version()}, torch {_version('torch')}, diffusers {_version('diffusers')}, "
        f"{os.cpu_count()} CPU cores.",
        "",
        "| check | count | what |",
        "|---|---:|---|",
        *(f"| {name} | {count} | {what} |" for name, count, what in rows),
        END,
    ]
    return "\n".join(lines)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=5.0, help="multiplies the randomized loops' sizes")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "reliability.md")
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        counts_file = Path(tmp) / "counts.json"
        env = {
            **os.environ,
            "DT_RELIABILITY_REPORT": str(counts_file),
            "DT_RELIABILITY_SCALE": str(args.scale),
        }
        command = [sys.executable, "-m", "pytest", "-p", "no:dt_conformance", "-q", "-rxX",
                   str(ROOT / "tests" / "reliability"), *args.pytest_args]  # fmt: skip
        with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) as process:
            output = []
            for line in process.stdout:  # shown as it comes, kept for the summary line
                sys.stdout.write(line)
                output.append(line)
        if process.returncode != 0:
            print(
                f"reliability suite failed (exit {process.returncode}); {args.doc} not updated",
                file=sys.stderr,
            )
            return process.returncode
        counts = json.loads(counts_file.read_text())
    summary = next((line.strip("= \n") for line in reversed(output) if re.search(r"\d+ passed", line)), "")
    table = render(counts, summary, args.scale)
    text = args.doc.read_text() if args.doc.exists() else f"# Reliability\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    args.doc.write_text(head + table + rest.split(END, 1)[1])
    print(f"wrote the table to {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
