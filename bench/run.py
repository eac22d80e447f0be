"""Benchmarks of Diffusion Templates against diffusers' own mechanisms; writes docs/performance.md.

    python bench/run.py            # the full run (a few minutes on 2 cores), writes docs/performance.md
    python bench/run.py --quick    # every row once or twice, prints the table, writes nothing

Every number is a ratio of two variants measured in the same process, in interleaved rounds (one call
of each variant per round), reported as the median over rounds. Models are built from configs with
random weights (nothing is downloaded): the tiny FLUX.2 [klein] pipeline of the test suite and a
medium one (a ~32M-parameter FLUX.2 transformer, 256x256). Torch runs on one thread by default:
on a shared machine that is far steadier than two threads fighting over two busy cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    MEDIUM,
    Brightness,
    PeftCycle,
    RandomKV,
    TransformerLoop,
    attention_linears,
    brightness_model,
    fmt_time,
    fused_lora,
    hand_written_kv,
    interleaved,
    make_host,
    median,
    n_params,
    random_kv,
    random_loras,
    ratio,
)

from diffusion_templates import TemplatePipeline  # noqa: E402
from diffusion_templates.carriers.kv import KVCarrier  # noqa: E402
from diffusion_templates.carriers.lora import LoraCarrier  # noqa: E402
from diffusion_templates.models import TemplateModelLoader  # noqa: E402
from diffusion_templates.store import TemplateCacheStore  # noqa: E402
from diffusion_templates.testing.tiny import build_flux2_klein, tiny_call_kwargs  # noqa: E402


# ------------------------------------------------------------------------------------------- models
class Model:
    """One benchmarked backbone: the pipeline, call kwargs, a transformer loop for per-step costs."""

    def __init__(
        self, name: str, pipe, kwargs: dict[str, Any], image_tokens: int, text_tokens: int, rank: int
    ):
        self.name, self.pipe, self.kwargs, self.rank = name, pipe, kwargs, rank
        self.loop = TransformerLoop(pipe.transformer, image_tokens, text_tokens)
        self.params = n_params(pipe.transformer)

    def call(self, target=None, **extra):
        return (target or self.pipe)(prompt="a red circle", **self.kwargs, **extra)


def build_models(quick: bool) -> list[Model]:
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    tiny = build_flux2_klein()
    tiny.set_progress_bar_config(disable=True)
    tiny_kwargs = tiny_call_kwargs("flux2_klein", steps=2, size=64, output_type="latent")
    models = [Model("tiny", tiny, tiny_kwargs, image_tokens=16, text_tokens=32, rank=4)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = Flux2Transformer2DModel(**MEDIUM).eval()
    base = build_flux2_klein()  # its tiny text encoder, tokenizer and VAE
    medium = Flux2KleinPipeline(
        scheduler=base.scheduler,
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        transformer=transformer,
        is_distilled=False,
    )
    medium.set_progress_bar_config(disable=True)
    medium_kwargs = tiny_call_kwargs("flux2_klein", steps=1 if quick else 2, size=256, output_type="latent")
    models.append(Model("medium", medium, medium_kwargs, image_tokens=256, text_tokens=32, rank=16))
    return models


# --------------------------------------------------------------------------------------------- rows
class Report:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.sections: list[str] = []
        self.curves: dict[str, Any] = {}

    def row(self, number, what, model, ours, baseline, value, target, met, note="", reason=""):
        """``reason``: why the target can be missed (printed under the table when it is)."""
        self.rows.append(
            dict(
                number=number,
                what=what,
                model=model,
                ours=ours,
                baseline=baseline,
                value=value,
                target=target,
                met=met,
                note=note,
                reason=reason,
            )
        )
        status = "" if met is None else ("met" if met else "MISSED")
        print(f"[{number}] {what} ({model}): {value} {target} {status} {note}", flush=True)


def row1_overhead(report: Report, m: Model, reps: int) -> None:
    tp = TemplatePipeline(m.pipe, plugins=make_host())
    times = interleaved(
        {"bare": lambda: m.call(), "tp": lambda: m.call(tp), "bare again": lambda: m.call()}, reps
    )
    r = ratio(times["tp"], times["bare"])
    spread = ratio(times["bare again"], times["bare"])
    tp_loop = TemplatePipeline(m.loop, plugins=make_host())
    fixed = interleaved({"tp": lambda: tp_loop(0), "bare": lambda: m.loop(0)}, 500)
    cost = median([a - b for a, b in zip(fixed["tp"], fixed["bare"], strict=True)])
    estimate = 1 + cost / median(times["bare"])
    report.row(
        1,
        "TemplatePipeline, no templates / bare pipeline",
        m.name,
        fmt_time(median(times["tp"])),
        fmt_time(median(times["bare"])),
        f"{r:.3f}x measured; {estimate:.5f}x from the wrapper's own cost",
        "<= 1.01x",
        estimate <= 1.01,
        f"A/A spread (bare / bare, same rounds) {spread:.3f}x; the wrapper's own cost is {fmt_time(cost)} "
        "per call (zero-step calls, 500 rounds); status from that cost",
    )


def row2_kv(
    report: Report, m: Model, reps: int, curve_reps: int, lengths: list[int], counts: list[int]
) -> None:
    host = make_host({"kv": RandomKV})
    tp = TemplatePipeline(m.pipe, plugins=host)
    transformer = m.pipe.transformer

    def pair(caches_specs, cache, n):
        times = interleaved(
            {
                "ours": lambda: m.call(tp, templates=caches_specs),
                "hand": lambda: _hand(m, transformer, cache),
                "bare": lambda: m.call(),
            },
            n,
        )
        return times

    cache = random_kv(tp.adapter, 64, 0)
    times = pair([{"template": "kv", "length": 64}], cache, reps)
    r = ratio(times["ours"], times["hand"])
    tp_loop = TemplatePipeline(m.loop, plugins=host)
    spec = [{"template": "kv", "length": 64}]

    def hand_zero():
        with hand_written_kv(transformer, cache):
            m.loop(0)

    zero = interleaved({"ours": lambda: tp_loop(0, templates=spec), "hand": hand_zero}, 300)
    fixed = median([a - b for a, b in zip(zero["ours"], zero["hand"], strict=True)])
    report.row(
        2,
        "kv carrier, L=64 / hand-written attention patch",
        m.name,
        fmt_time(median(times["ours"])),
        fmt_time(median(times["hand"])),
        f"{r:.3f}x",
        "<= 1.03x",
        r <= 1.03,
        f"fixed cost per call beyond the hand-written patch: {fmt_time(fixed)} (zero-step calls)",
        reason=f"the carrier's own fixed cost, measured directly, is {fmt_time(fixed)} per call, "
        f"{100 * fixed / median(times['hand']):.1f}% of the {fmt_time(median(times['hand']))} call; the "
        "rest of the difference is run-to-run noise of this shared machine (row 1's A/A column shows "
        "the spread of identical work in the same run)",
    )
    curve = []
    for length in lengths:
        cache = random_kv(tp.adapter, length, 0)
        t = pair([{"template": "kv", "length": length}], cache, curve_reps)
        curve.append(
            (
                length,
                median(t["ours"]),
                median(t["hand"]),
                ratio(t["ours"], t["hand"]),
                ratio(t["ours"], t["bare"]),
            )
        )
    report.curves[f"kv_length_{m.name}"] = curve
    composed = []
    carrier = KVCarrier()
    for count in counts:
        specs = [{"template": "kv", "length": 64, "seed": s} for s in range(count)]
        merged = carrier.merge_caches([random_kv(tp.adapter, 64, s) for s in range(count)])
        t = pair(specs, merged, curve_reps)
        composed.append(
            (
                count,
                median(t["ours"]),
                median(t["hand"]),
                ratio(t["ours"], t["hand"]),
                ratio(t["ours"], t["bare"]),
            )
        )
    report.curves[f"kv_templates_{m.name}"] = composed


def _hand(m: Model, transformer, cache) -> None:
    with hand_written_kv(transformer, cache):
        m.call()


def row3_lora(report: Report, m: Model, reps: int, counts: list[int], steps: int) -> None:
    transformer = m.pipe.transformer
    targets = attention_linears(transformer)
    host = make_host()
    tp_pipe = TemplatePipeline(m.pipe, plugins=host)
    tp_loop = TemplatePipeline(m.loop, plugins=host)
    carrier = LoraCarrier()
    details = []
    for count in counts:
        loras = random_loras(transformer, targets, count, m.rank, seed=count)
        merged = loras[0] if count == 1 else carrier.merge_caches(loras)
        peft = PeftCycle(m.pipe, loras)

        def peft_switch(peft=peft):
            peft.load()
            m.loop(0)
            peft.unload()

        def peft_cycle(peft=peft):
            peft.load()
            m.call()
            peft.unload()

        switch = interleaved(
            {"ours": lambda loras=loras: tp_loop(0, templates=loras), "peft": peft_switch}, reps
        )
        r_switch = ratio(switch["peft"], switch["ours"])
        report.row(
            3,
            f"LoRA switch (apply+remove), {count} LoRA(s): diffusers / ours",
            m.name,
            fmt_time(median(switch["ours"])),
            fmt_time(median(switch["peft"])),
            f"{r_switch:.0f}x faster",
            ">= 10x",
            r_switch >= 10,
            f"rank {m.rank}, {len(targets)} Linear modules",
        )
        cycle = interleaved(
            {"ours": lambda loras=loras: m.call(tp_pipe, templates=loras), "peft": peft_cycle},
            max(3, reps // 2),
        )
        r_cycle = ratio(cycle["peft"], cycle["ours"])
        report.row(
            3,
            f"LoRA apply+call+remove, {count} LoRA(s): diffusers / ours",
            m.name,
            fmt_time(median(cycle["ours"])),
            fmt_time(median(cycle["peft"])),
            f"{r_cycle:.2f}x faster",
            "report",
            None,
        )
        # per-step cost: unfused (ours, PEFT) vs fused (a manually fused copy of the weights), all in
        # the same rounds; PEFT's loading and the fusing happen outside the timed calls
        step = interleaved(
            {
                "bare": lambda: m.loop(steps),
                "ours": lambda loras=loras: tp_loop(steps, templates=loras),
                "ours0": lambda loras=loras: tp_loop(0, templates=loras),
                "peft": lambda: m.loop(steps),
                "fused": lambda: m.loop(steps),
            },
            reps,
            contexts={"peft": peft.loaded, "fused": lambda merged=merged: fused_lora(transformer, merged)},
        )
        peft_step, fused_step = step["peft"], step["fused"]
        fuse = interleaved(
            {"fuse": lambda merged=merged: _fuse_restore(transformer, merged)}, max(3, reps // 2)
        )
        bare = median(step["bare"]) / steps
        ours = median([(a - b) / steps for a, b in zip(step["ours"], step["ours0"], strict=True)])
        unfused_vs_fused = median(
            [(a - b) / c for a, b, c in zip(step["ours"], step["ours0"], step["fused"], strict=True)]
        )
        fused = median(fused_step) / steps
        peft_s = median(peft_step) / steps
        fuse_s = median(fuse["fuse"])
        saving = ours - fused
        breakeven = fuse_s / saving if saving > 0 else float("inf")
        details.append(
            dict(
                count=count,
                bare=bare,
                ours=ours,
                peft=peft_s,
                fused=fused,
                fuse=fuse_s,
                breakeven=breakeven,
                switch_ours=median(switch["ours"]),
                switch_peft=median(switch["peft"]),
            )
        )
        report.row(
            3,
            f"LoRA per step, {count} LoRA(s): unfused (ours) / fused",
            m.name,
            fmt_time(ours),
            fmt_time(fused),
            f"{unfused_vs_fused:.3f}x",
            "report",
            None,
            f"PEFT unfused {fmt_time(peft_s)}; fuse+restore {fmt_time(fuse_s)}; "
            f"break-even {breakeven:.0f} steps",
        )
    report.curves[f"lora_{m.name}"] = details


def _fuse_restore(transformer, merged) -> None:
    with fused_lora(transformer, merged):
        pass


def row4_store(report: Report, m: Model, reps: int, tmp: Path) -> None:
    folder = tmp / f"brightness-{m.name}"
    adapter = TemplatePipeline(m.pipe, plugins=make_host()).adapter
    model = brightness_model(adapter, tokens=16, hidden_dim=256)
    model.save_pretrained(folder)
    loader = TemplateModelLoader()
    host = make_host({"brightness": Brightness(folder, loader)})
    tp = TemplatePipeline(m.pipe, plugins=host)
    disk = TemplateCacheStore(max_bytes=0, disk_dir=tmp / f"store-{m.name}")
    tp_disk = TemplatePipeline(m.pipe, plugins=host, store=disk)
    tp_none = TemplatePipeline(m.pipe, plugins=host, store=None)
    counter = iter(range(10**9))

    def unique() -> dict:
        return {"template": "brightness", "scale": 0.25 + next(counter) * 1e-7}

    def cold_miss():
        loader.clear()
        tp.encode(unique())

    spec = {"template": "brightness", "scale": 0.5}
    tp.encode(spec)
    tp_disk.encode(spec)
    fns = {
        "hit": lambda: tp.encode(spec),
        "miss": lambda: tp.encode(unique()),
        "no store": lambda: tp_none.encode(spec),
        "disk hit": lambda: tp_disk.encode(spec),
    }
    times = interleaved(fns, reps)
    cold = interleaved({"cold": cold_miss, "hit": lambda: tp.encode(spec)}, max(5, reps // 10))
    warm = interleaved({"hit": lambda: tp.encode(spec)}, 20 * reps)  # back to back: warm CPU caches
    r = ratio(times["hit"], times["miss"])
    warm_hit = median(warm["hit"])
    nbytes = tp.store.nbytes // max(1, len(tp.store))
    report.row(
        4,
        "store hit / miss (Template model resident)",
        m.name,
        fmt_time(median(times["hit"])),
        fmt_time(median(times["miss"])),
        f"{100 * r:.1f}%",
        "<= 2%",
        r <= 0.02,
        f"model {n_params(model) / 1e6:.1f}M params, cache {nbytes / 1024:.0f} KiB; "
        f"no store {fmt_time(median(times['no store']))}; hits back to back (warm CPU caches) "
        f"{fmt_time(warm_hit)}, {100 * warm_hit / median(times['miss']):.1f}% of a miss",
        reason=f"the hit's fixed cost ({fmt_time(median(times['hit']))}: validation, key, lookup, copies) "
        "is measured right after a miss whose forward pass left the CPU caches cold, against a miss of a "
        f"{n_params(model) / 1e6:.1f}M-parameter Template model that takes only "
        f"{fmt_time(median(times['miss']))}; back to back the hit is {fmt_time(warm_hit)} "
        "(bench/notes.md, Store hits)",
    )
    rc = ratio(cold["hit"], cold["cold"])
    report.row(
        4,
        "store hit / miss with the model loaded from disk",
        m.name,
        fmt_time(median(cold["hit"])),
        fmt_time(median(cold["cold"])),
        f"{100 * rc:.2f}%",
        "report",
        None,
        f"disk-store hit {fmt_time(median(times['disk hit']))}",
    )


def row5_cli(report: Report, reps: int) -> None:
    python = sys.executable
    dt = str(Path(python).with_name("dt"))
    check = (
        "import sys; from diffusion_templates.cli import main; import io, contextlib\n"
        "with contextlib.redirect_stdout(io.StringIO()): main(['list'])\n"
        "print('torch' in sys.modules, 'diffusers' in sys.modules)"
    )
    out = subprocess.run([python, "-c", check], capture_output=True, text=True, check=True).stdout.split()
    imports_torch = out[0] == "True"
    fns = {
        "dt list": lambda: subprocess.run([dt, "list"], capture_output=True, check=True),
        "import diffusers": lambda: subprocess.run([python, "-c", "import diffusers"], check=True),
        "import torch": lambda: subprocess.run([python, "-c", "import torch"], check=True),
    }
    times = interleaved(fns, reps, warmup=0)
    r = ratio(times["dt list"], times["import diffusers"])
    report.row(
        5,
        '`dt list` / `python -c "import diffusers"` (subprocesses)',
        "-",
        fmt_time(median(times["dt list"])),
        fmt_time(median(times["import diffusers"])),
        f"{r:.2f}x",
        "dt list imports no torch",
        not imports_torch,
        f"imports torch: {imports_torch}; `import torch` alone {fmt_time(median(times['import torch']))}",
    )


def row6_memory(report: Report, tmp: Path) -> None:
    from common import BrightnessModel

    root = tmp / "models10"
    layer_names = ("double_0", "double_1", "single_0", "single_1")  # the tiny FLUX.2's layers
    for i in range(10):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(i)
            BrightnessModel(layer_names=layer_names, heads=2, head_dim=16, hidden_dim=512).save_pretrained(
                root / f"m{i}"
            )
    results = {}
    for mode in ("eager", "lazy", "lazy-all", "lazy-2"):
        proc = subprocess.run(
            [sys.executable, str(HERE / "memory_child.py"), mode, str(root)],
            capture_output=True,
            text=True,
            cwd=HERE,
        )
        if proc.returncode:
            raise RuntimeError(f"memory_child {mode} failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 2**20
    eager, lazy = results["eager"], results["lazy"]
    report.row(
        6,
        "peak memory, 10 templates registered, 1 used: lazy / eager",
        "tiny",
        f"{lazy['delta'] / mib:.0f} MiB",
        f"{eager['delta'] / mib:.0f} MiB",
        f"{lazy['delta'] / eager['delta']:.2f}x",
        "report",
        None,
        f"10 models of {eager['per_model'] / mib:.1f} MiB; registering: eager "
        f"{fmt_time(eager['register_s'])}, lazy {fmt_time(lazy['register_s'])}",
    )
    report.row(
        6,
        "peak memory, all 10 used in turn: budget 2.5 models / unbounded",
        "tiny",
        f"{results['lazy-2']['delta'] / mib:.0f} MiB",
        f"{results['lazy-all']['delta'] / mib:.0f} MiB",
        f"{results['lazy-2']['delta'] / results['lazy-all']['delta']:.2f}x",
        "report",
        None,
        f"kept {results['lazy-2']['models_kept']} vs {results['lazy-all']['models_kept']} models",
    )
    report.curves["memory"] = results


# ------------------------------------------------------------------------------------------ output
def plots(report: Report, out_dir: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for kind, xlabel, xscale in (
        ("kv_length", "extra tokens L", "symlog"),
        ("kv_templates", "templates", "linear"),
    ):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, curve in report.curves.items():
            if key.startswith(kind):
                xs = [c[0] for c in curve]
                ax.plot(xs, [c[1] * 1e3 for c in curve], "o-", label=f"ours ({key.rsplit('_', 1)[1]})")
                ax.plot(
                    xs, [c[2] * 1e3 for c in curve], "x--", label=f"hand-written ({key.rsplit('_', 1)[1]})"
                )
        ax.set_xscale(xscale)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms per pipeline call")
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"performance-{kind.replace('_', '-')}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def markdown(report: Report, meta: dict[str, Any], pngs: list[str]) -> str:
    lines = [
        "# Performance",
        "",
        "Generated by `nox -s bench` (`python bench/run.py`); GPU rows by `bench/gpu.sh`. Every ratio",
        "compares two variants measured in the same process in interleaved rounds (one call of each per",
        "round) and is the median over rounds. Weights are random, from configs; nothing is downloaded.",
        "",
        f"Machine: {meta['machine']}; torch {meta['torch']} on {meta['threads']} thread(s); "
        f"{meta['repeats']}; run took {meta['elapsed']:.0f} s.",
        "",
        "Models: **tiny** = the test suite's FLUX.2 [klein] pipeline "
        f"({meta['tiny_params'] / 1e6:.2f}M-parameter "
        "transformer, 64x64, 2 steps); **medium** = Flux2KleinPipeline with a "
        f"{meta['medium_params'] / 1e6:.0f}M-parameter FLUX.2 transformer (2 double + 4 single blocks, "
        f"8 heads x 64), 256x256 = 256 image tokens + 32 text tokens, {meta['medium_steps']} steps.",
        "",
        "| # | measurement | model | ours | baseline | value | target | status | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    gpu = HERE / "gpu_results.md"
    rows = list(report.rows)
    if not gpu.exists():
        rows.append(
            dict(
                number=7,
                what="rows 1-3 at full size: FLUX.2 [klein] 4B transformer, bfloat16, one GPU",
                model="4B",
                ours="-",
                baseline="-",
                value="-",
                target="rows 1-3's",
                met=None,
                status="**not run yet**",
                note=f"no GPU machine was available to the project; run it with {GPU_COMMAND} "
                "(section below)",
            )
        )
    for r in rows:
        status = r.get("status") or ("-" if r["met"] is None else ("met" if r["met"] else "**missed**"))
        lines.append(
            f"| {r['number']} | {r['what']} | {r['model']} | {r['ours']} | {r['baseline']} | {r['value']} | "
            f"{r['target']} | {status} | {r['note']} |"
        )
    judged = [r for r in report.rows if r["met"] is not None]
    missed = [
        f"row {r['number']} ({r['model']}: {r['value']} vs {r['target']})" for r in judged if not r["met"]
    ]
    lines += [
        "",
        f"**Targets: {len(judged) - len(missed)} of {len(judged)} met**"
        + (f"; missed: {', '.join(missed)}." if missed else "."),
    ]
    for r in judged:
        if not r["met"]:
            why = r.get("reason") or "see the row's note and Reading the results below"
            lines += ["", f"- Why row {r['number']} ({r['model']}) missed: {why}."]
    if not gpu.exists():
        lines += ["", f"- Row 7 is not run yet: no GPU machine was available to the project ({GPU_COMMAND})."]
    for key, curve in report.curves.items():
        if key.startswith("kv_length"):
            lines += [
                "",
                f"### kv cost over L ({key.rsplit('_', 1)[1]})",
                "",
                "| L | ours | hand-written | ours / hand-written | ours / bare pipeline |",
                "|---|---|---|---|---|",
            ]
            lines += [
                f"| {c[0]} | {fmt_time(c[1])} | {fmt_time(c[2])} | {c[3]:.3f}x | {c[4]:.2f}x |" for c in curve
            ]
        elif key.startswith("kv_templates"):
            lines += [
                "",
                f"### kv cost over composed templates, 64 tokens each ({key.rsplit('_', 1)[1]})",
                "",
                "| templates | ours | hand-written (merged cache) | ours / hand-written | ours / bare |",
                "|---|---|---|---|---|",
            ]
            lines += [
                f"| {c[0]} | {fmt_time(c[1])} | {fmt_time(c[2])} | {c[3]:.3f}x | {c[4]:.2f}x |" for c in curve
            ]
        elif key.startswith("lora"):
            lines += [
                "",
                f"### LoRA switching and per-step cost ({key.rsplit('_', 1)[1]})",
                "",
                "| LoRAs | switch: ours | switch: diffusers | step: bare | step: ours (unfused) | "
                "step: PEFT (unfused) | step: fused | fuse + restore | break-even |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {d['count']} | {fmt_time(d['switch_ours'])} | {fmt_time(d['switch_peft'])} | "
                f"{fmt_time(d['bare'])} | {fmt_time(d['ours'])} | {fmt_time(d['peft'])} | "
                f"{fmt_time(d['fused'])} | "
                f"{fmt_time(d['fuse'])} | {d['breakeven']:.0f} steps |"
                for d in curve
            ]
            if key.endswith("medium"):
                lines += [
                    "",
                    "Fusing pays on long calls, so it is offered: "
                    "`TemplatePipeline(pipe, lora_fusion=\"auto\")` writes the LoRA into the weights (the "
                    "same `fuse_into_weights` measured as \"step: "
                    "fused\" here) for calls of at least `FUSE_MIN_STEPS` = 16 steps, the largest "
                    "break-even above rounded up, and puts the weights back from a copy afterwards (bit "
                    "for bit, never by subtraction). It fuses only where that is exact: not when "
                    "classifier-free guidance runs a branch the LoRA must miss, never for negative "
                    "templates. The default stays `\"off\"` (unfused hooks): fused weights would be "
                    "visible to a raw diffusers call of the same modules from another thread while the "
                    "call runs. `tests/test_lora_fusion.py` checks fused = unfused (< 1e-4) on all five "
                    "backbones and the restoration.",
                ]
    if pngs:
        lines += ["", *[f"![{p}]({p})" for p in pngs]]
    else:
        lines += [
            "",
            "_No plots: matplotlib is not installed in this environment (the tables above hold the "
            "same numbers)._",
        ]
    lines += ["", "## Row 7, GPU: FLUX.2 [klein] 4B (rows 1-3 at full size)", ""]
    if gpu.exists():
        lines += [gpu.read_text().replace("# GPU benchmark (rows 1-3)", "").strip()]
    else:
        lines += [
            "**Not run yet: no GPU machine was available to the project.** `bench/gpu.sh` builds the",
            "full-size transformer in bfloat16 on one GPU (random weights, 4096 image + 512 text tokens)",
            "and runs rows 1-3 in a few minutes; it prints its table and writes `$OUT/gpu_results.md`.",
            "On a machine with one CUDA GPU, from the repository root:",
            "",
            "```bash",
            GPU_COMMAND.strip("`"),
            "```",
            "",
            "The first command writes `bench/gpu_results.md`; the second regenerates this file, which",
            "then shows that table here instead of this note.",
        ]
    lines += ["", meta["notes"]]
    return "\n".join(lines) + "\n"


NOTES_PATH = HERE / "notes.md"
#: How to produce row 7 (bench/gpu.sh writes $OUT/gpu_results.md; run.py shows bench/gpu_results.md).
GPU_COMMAND = "`OUT=bench bash bench/gpu.sh && python bench/run.py`"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every row with minimal repeats; writes nothing")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: steadier when shared)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="markdown output (default docs/performance.md)"
    )
    parser.add_argument("--only", default="123456", help="rows to run, e.g. 14")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    quick = args.quick
    reps = dict(
        overhead=(3, 8),
        kv=(2, 6),
        curve=(1, 3),
        lora=(2, 3),
        store=(5, 60),
        cli=(1, 3),
    )
    pick = {k: v[0] if quick else v[1] for k, v in reps.items()}
    lengths = [0, 64, 1024] if quick else [0, 16, 64, 256, 1024, 4096]
    counts = [1, 3] if quick else [1, 2, 3, 5, 10]
    lora_counts = [1, 3] if quick else [1, 3, 10]
    report = Report()
    models = build_models(quick)
    for m in models:
        m.call()  # warm up
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def done(label: str) -> None:
            print(f"--- {label} done at {time.perf_counter() - start:.0f} s", flush=True)

        if "1" in args.only:
            for m in models:
                row1_overhead(report, m, pick["overhead"] * (3 if m.name == "tiny" else 1))
            done("row 1")
        if "2" in args.only:
            for m in models:
                big = m.name == "tiny"
                row2_kv(
                    report,
                    m,
                    pick["kv"] * (3 if big else 1),
                    pick["curve"] * (3 if big else 1),
                    lengths if big else [x for x in lengths if x in (0, 1024, 4096)],
                    counts if big else [c for c in counts if c in (1, 10)],
                )
            done("row 2")
        if "3" in args.only:
            for m in models:
                row3_lora(report, m, pick["lora"] * (3 if m.name == "tiny" else 1), lora_counts, steps=2)
            done("row 3")
        if "4" in args.only:
            for m in models:
                row4_store(report, m, pick["store"], tmp)
            done("row 4")
        if "5" in args.only:
            row5_cli(report, pick["cli"])
            done("row 5")
        if "6" in args.only:
            row6_memory(report, tmp)
            done("row 6")
    elapsed = time.perf_counter() - start
    meta = dict(
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        torch=torch.__version__,
        threads=args.threads,
        repeats=(
            f"rounds: overhead {pick['overhead'] * 3}/{pick['overhead']} (tiny/medium), kv {pick['kv'] * 3}/"
            f"{pick['kv']}, curves {pick['curve'] * 3}/{pick['curve']}, "
            f"LoRA {pick['lora'] * 3}/{pick['lora']}, "
            f"store {pick['store']}, CLI {pick['cli']}"
        ),
        elapsed=elapsed,
        tiny_params=models[0].params,
        medium_params=models[1].params,
        medium_steps=models[1].kwargs["num_inference_steps"],
        notes=NOTES_PATH.read_text() if NOTES_PATH.exists() else "",
    )
    out = args.out or (None if quick else ROOT / "docs" / "performance.md")
    pngs = plots(report, out.parent) if out is not None else []
    text = markdown(report, meta, pngs)
    if out is not None:
        out.write_text(text)
        print(f"wrote {out} ({elapsed:.0f} s)")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
