"""Benchmark rows 1-3 on one GPU with a full-size FLUX.2 [klein] 4B transformer (random weights).

Run through ``bench/gpu.sh`` (it installs the carried wheels first). The transformer is built from
its config directly on the GPU in bfloat16 (about 4B parameters, no download, no text encoder or
VAE) and driven by :class:`common.TransformerLoop`: fixed random inputs with a 1024x1024 image's
token count (4096) and 512 text tokens, a few Euler steps per call.

    python bench/gpu.py                      # full size, on cuda (~3-5 minutes on an H100)
    python bench/gpu.py --tiny --device cpu  # the same logic on a small config, to check the script

Prints a compact results table and writes it to ``$OUT/gpu_results.md`` when ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "host"))

import torch  # noqa: E402
from common import (  # noqa: E402
    KLEIN_4B,
    KLEIN_TINY,
    PeftCycle,
    RandomKV,
    TransformerLoop,
    attention_linears,
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
    sync,
)

from diffusion_templates import TemplatePipeline  # noqa: E402
from diffusion_templates.carriers.kv import KVCarrier  # noqa: E402
from diffusion_templates.carriers.lora import LoraCarrier  # noqa: E402
from diffusion_templates.store import TemplateCacheStore  # noqa: E402


class Results:
    def __init__(self, deadline: float) -> None:
        self.rows: list[tuple[str, ...]] = []
        self.deadline = deadline
        self.skipped: list[str] = []

    def add(self, number, what, ours, baseline, value, target="report", met=None, note="") -> None:
        status = "-" if met is None else ("met" if met else "MISSED")
        self.rows.append((str(number), what, ours, baseline, value, target, status, note))
        print(
            f"[{number}] {what}: ours {ours}, baseline {baseline} -> {value} ({target}: {status}) {note}",
            flush=True,
        )

    def time_left(self, label: str, needed: float) -> bool:
        if time.monotonic() + needed > self.deadline:
            self.skipped.append(label)
            print(f"skipping {label}: not enough of the time budget left", flush=True)
            return False
        return True


def build(args) -> tuple[TransformerLoop, int]:
    from diffusers import Flux2Transformer2DModel

    config = dict(KLEIN_TINY if args.tiny else KLEIN_4B)
    device = torch.device(args.device)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(dtype)  # parameters are created in bf16 directly, on the device
        with device:
            transformer = Flux2Transformer2DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    transformer = transformer.to(device=device, dtype=dtype).eval().requires_grad_(False)
    image_tokens, text_tokens = (256, 32) if args.tiny else (4096, 512)
    loop = TransformerLoop(transformer, image_tokens=image_tokens, text_tokens=text_tokens)
    return loop, n_params(transformer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small config with the klein structure")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 elsewhere")
    parser.add_argument("--steps", type=int, default=2, help="transformer forward passes per call")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per comparison (default 8, tiny 3)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="skip what would not finish within this"
    )
    args = parser.parse_args(argv)
    start = time.monotonic()
    results = Results(deadline=start + args.budget_s)
    reps = args.repeats or (3 if args.tiny else 8)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    loop, params = build(args)
    steps = args.steps
    transformer = loop.transformer
    build_s = time.monotonic() - start
    print(f"built {params / 1e9:.2f}B-parameter transformer in {build_s:.0f} s", flush=True)
    host = make_host({"kv": RandomKV})
    # A kv cache of L=4096 tokens on all 25 layers is 1.3 GB in bf16, over the default store's 512 MiB:
    # give the store room, or every call would recompute the (random) template.
    tp = TemplatePipeline(loop, plugins=host, store=TemplateCacheStore(max_bytes=16 * 2**30))
    loop(steps)  # warm up kernels, cuBLAS handles, the attention backend
    t0 = time.monotonic()
    loop(steps)
    call_s = time.monotonic() - t0
    print(f"one call ({steps} forward passes): {fmt_time(call_s)}", flush=True)

    # 1. no templates -----------------------------------------------------------------------------
    t = interleaved(
        {"bare": lambda: loop(steps), "tp": lambda: tp(steps), "bare again": lambda: loop(steps)}, reps
    )
    r = ratio(t["tp"], t["bare"])
    zero = interleaved({"tp": lambda: tp(0), "bare": lambda: loop(0)}, 200)
    cost = median([a - b for a, b in zip(zero["tp"], zero["bare"], strict=True)])
    results.add(
        1,
        "TemplatePipeline, no templates / bare",
        fmt_time(median(t["tp"])),
        fmt_time(median(t["bare"])),
        f"{r:.4f}x",
        "<= 1.01x",
        r <= 1.01,
        f"A/A spread {ratio(t['bare again'], t['bare']):.4f}x; wrapper cost {fmt_time(cost)} per call",
    )

    # 2. kv ----------------------------------------------------------------------------------------
    def kv_compare(specs, cache, n):
        def hand():
            with hand_written_kv(transformer, cache):
                loop(steps)

        return interleaved(
            {"ours": lambda: tp(steps, templates=specs), "hand": hand, "bare": lambda: loop(steps)}, n
        )

    cache = random_kv(tp.adapter, 64, 0)
    t = kv_compare([{"template": "kv", "length": 64}], cache, reps)
    r = ratio(t["ours"], t["hand"])

    def hand_zero():
        with hand_written_kv(transformer, cache):
            loop(0)

    zero = interleaved(
        {"ours": lambda: tp(0, templates=[{"template": "kv", "length": 64}]), "hand": hand_zero}, 100
    )
    fixed = median([a - b for a, b in zip(zero["ours"], zero["hand"], strict=True)])
    results.add(
        2,
        "kv carrier L=64 / hand-written patch",
        fmt_time(median(t["ours"])),
        fmt_time(median(t["hand"])),
        f"{r:.4f}x",
        "<= 1.03x",
        r <= 1.03,
        f"vs bare {ratio(t['ours'], t['bare']):.3f}x; fixed cost beyond the patch {fmt_time(fixed)} per call",
    )
    curve_reps = max(2, reps // 2)
    for length in (0, 256, 1024, 4096):
        if not results.time_left(f"kv L={length}", 3 * (curve_reps + 1) * call_s * 1.5):
            break
        cache = random_kv(tp.adapter, length, 0)
        t = kv_compare([{"template": "kv", "length": length}], cache, curve_reps)
        results.add(
            2,
            f"kv L={length} / hand-written",
            fmt_time(median(t["ours"])),
            fmt_time(median(t["hand"])),
            f"{ratio(t['ours'], t['hand']):.4f}x",
            note=f"vs bare {ratio(t['ours'], t['bare']):.3f}x",
        )
    carrier = KVCarrier()
    for count in (1, 3, 10):
        if not results.time_left(f"kv {count} templates", 3 * (curve_reps + 1) * call_s * 1.5):
            break
        specs = [{"template": "kv", "length": 64, "seed": s} for s in range(count)]
        merged = carrier.merge_caches([random_kv(tp.adapter, 64, s) for s in range(count)])
        t = kv_compare(specs, merged, curve_reps)
        results.add(
            2,
            f"kv {count} templates x 64 tokens / hand-written",
            fmt_time(median(t["ours"])),
            fmt_time(median(t["hand"])),
            f"{ratio(t['ours'], t['hand']):.4f}x",
            note=f"vs bare {ratio(t['ours'], t['bare']):.3f}x",
        )

    # 3. LoRA --------------------------------------------------------------------------------------
    targets = attention_linears(transformer)
    lora_carrier = LoraCarrier()
    param = next(transformer.parameters())
    for count in (1, 3, 10):
        if not results.time_left(f"LoRA x{count}", (count * 2.0 + call_s) * 6):
            break
        loras = [
            lora.to(param.device, param.dtype)  # as a template running on the device would produce them
            for lora in random_loras(transformer, targets, count, args.rank, seed=count)
        ]
        merged = loras[0] if count == 1 else lora_carrier.merge_caches(loras)
        peft = PeftCycle(loop, loras)
        n = max(2, reps // 2) if count < 10 else 2

        def peft_switch(peft=peft):
            peft.load()
            loop(0)
            peft.unload()
            sync(device)

        switch = interleaved({"ours": lambda loras=loras: tp(0, templates=loras), "peft": peft_switch}, n)
        r = ratio(switch["peft"], switch["ours"])
        results.add(
            3,
            f"LoRA switch x{count} (rank {args.rank}, {len(targets)} Linears): diffusers / ours",
            fmt_time(median(switch["ours"])),
            fmt_time(median(switch["peft"])),
            f"{r:.0f}x faster",
            ">= 10x",
            r >= 10,
        )

        def peft_cycle(peft=peft):
            peft.load()
            loop(steps)
            peft.unload()
            sync(device)

        cycle = interleaved({"ours": lambda loras=loras: tp(steps, templates=loras), "peft": peft_cycle}, n)
        results.add(
            3,
            f"LoRA apply+call+remove x{count}: diffusers / ours",
            fmt_time(median(cycle["ours"])),
            fmt_time(median(cycle["peft"])),
            f"{ratio(cycle['peft'], cycle['ours']):.2f}x faster",
        )
        step = interleaved(  # all variants in the same rounds; loading / fusing outside the timing
            {
                "bare": lambda: loop(steps),
                "ours": lambda loras=loras: tp(steps, templates=loras),
                "ours0": lambda loras=loras: tp(0, templates=loras),
                "peft": lambda: loop(steps),
                "fused": lambda: loop(steps),
            },
            n,
            contexts={"peft": peft.loaded, "fused": lambda merged=merged: fused_lora(transformer, merged)},
        )
        peft_t, fused_t = step["peft"], step["fused"]

        def fuse_restore(merged=merged):
            with fused_lora(transformer, merged):
                pass
            sync(device)

        fuse_t = interleaved({"fuse": fuse_restore}, n)["fuse"]
        ours_step = median([(a - b) / steps for a, b in zip(step["ours"], step["ours0"], strict=True)])
        unfused_vs_fused = median(
            [(a - b) / c for a, b, c in zip(step["ours"], step["ours0"], step["fused"], strict=True)]
        )
        fused_step = median(fused_t) / steps
        saving = ours_step - fused_step
        breakeven = median(fuse_t) / saving if saving > 0 else float("inf")
        results.add(
            3,
            f"LoRA per step x{count}: unfused (ours) / fused",
            fmt_time(ours_step),
            fmt_time(fused_step),
            f"{unfused_vs_fused:.3f}x",
            note=f"bare {fmt_time(median(step['bare']) / steps)}, PEFT unfused "
            f"{fmt_time(median(peft_t) / steps)}, fuse+restore {fmt_time(median(fuse_t))}, "
            f"break-even {breakeven:.0f} steps",
        )

    elapsed = time.monotonic() - start
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    )
    peak = (
        f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
        if device.type == "cuda"
        else ""
    )
    header = (
        f"# GPU benchmark (rows 1-3)\n\n{device_name}, torch {torch.__version__}; FLUX.2 [klein] "
        f"{'TINY stand-in' if args.tiny else '4B'} transformer, {params / 1e9:.2f}B parameters, "
        f"{str(param.dtype).replace('torch.', '')}, random weights; {loop.latents.shape[1]} image + "
        f"{loop.text.shape[1]} text tokens, {steps} forward passes per call; {reps} rounds (curves and LoRA "
        f"fewer), medians; built in {build_s:.0f} s, total {elapsed:.0f} s{peak}.\n"
    )
    table = [
        "| # | measurement | ours | baseline | value | target | status | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    table += ["| " + " | ".join(row) + " |" for row in results.rows]
    text = header + "\n" + "\n".join(table) + "\n"
    if results.skipped:
        text += f"\nSkipped for time: {', '.join(results.skipped)}.\n"
    print("\n" + text)
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_results.md").write_text(text)
        print(f"wrote {Path(out, 'gpu_results.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
