"""``dt demo`` and ``dt generate``: the main job from the command line.

The base model is the embedded default (a distribution exposing ``diffusion_templates.base_models``
entry points, e.g. ``dt-base-shapes``) unless ``--base`` names a diffusers folder or hub id. With no
embedded model installed, a tiny random-weight FLUX.2 klein pipeline stands in, and the demo says so:
its images show the mechanics (each template's measurable effect), not pictures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .cli import BASE_MODELS_GROUP, UsageError
from .errors import TemplateError
from .installed import entries
from .plugins import PluginHost, default_host

# The paper's fusion examples (figures 12-15), shown when every template in a row is installed.
FUSIONS = [
    ("superres", "sharpness"),
    ("depth", "color", "brightness"),
    ("structure-kv", "color-kv", "brightness-kv"),  # the same idea with the trained shapes templates
    ("depth", "aesthetic", "sharpness"),
    ("inpaint", "edit", "brightness"),
]


@dataclass
class BaseModel:
    """A pipeline plus the call arguments it needs, and what to tell the user about it."""

    pipe: Any
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    prompts: list[str] = field(
        default_factory=lambda: ["a large red circle in the center on a blue background"]
    )


def load_base(base: str | None, *, allow_pickle: bool = False) -> BaseModel:
    """``--base`` (a diffusers folder or hub id), else the embedded model, else a tiny random FLUX.2.

    ``base`` is loaded from safetensors only unless ``allow_pickle`` (``--allow-pickle``): a folder
    with pickle weights is refused, naming them, before anything is loaded (``pickle_guard``). A job
    file cannot allow pickles, only the person running the command.
    """
    with quiet_loading():
        if base:
            return BaseModel(_load_folder_or_hub(base, allow_pickle), {}, f"diffusers pipeline from {base}")
        for entry in entries([BASE_MODELS_GROUP]):
            where = f"base model {entry.name!r} (distribution {entry.dist.name})"
            if entry.problem is not None:
                print(f"dt: warning: {where} is broken: {entry.problem}", file=sys.stderr)
                continue
            loader: Callable[[], BaseModel] = entry.entry_point().load()
            return loader()
    from .testing.tiny import TINY_PIPELINES

    spec = TINY_PIPELINES["flux2_klein"]
    return BaseModel(
        spec.build(),
        {**spec.call_kwargs, **spec.cfg_kwargs, "num_inference_steps": 4, "height": 64, "width": 64},
        "a tiny FLUX.2 klein pipeline with RANDOM weights (no embedded model is installed): the images show "
        "each template's measurable effect, not meaningful pictures",
    )


#: A hub id: ``name`` or ``owner/name`` (letters, digits, ``-_.``), not starting with a dot.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _load_folder_or_hub(base: str, allow_pickle: bool) -> Any:
    """``--base``: a diffusers folder or a hub id; anything else is a :class:`UsageError`, not a traceback."""
    from diffusers import DiffusionPipeline

    from .pickle_guard import from_pretrained

    source = check_base(base)
    try:
        return from_pretrained(
            DiffusionPipeline.from_pretrained,
            source,
            allow_pickle=allow_pickle,
            low_cpu_mem_usage=_accelerate(),
        )
    except TemplateError:  # pickle weights refused: its own message
        raise
    except (OSError, ValueError) as exc:  # not on the hub, offline, missing files: diffusers says which
        raise UsageError(f"--base {base!r}: could not load a diffusers pipeline: {exc}") from None


def check_base(base: str) -> str:
    """``--base`` as ``from_pretrained`` takes it (a folder or a hub id), or a :class:`UsageError`
    before anything loads: a path that does not exist, a folder that is no diffusers pipeline."""
    folder = Path(base).expanduser()
    if not folder.exists():
        if not _HUB_ID.match(base):
            raise UsageError(
                f"--base {base!r}: no such folder (give a diffusers pipeline folder or a hub id)"
            )
        return base
    if not (folder / "model_index.json").is_file():
        raise UsageError(f"--base {base!r}: not a diffusers pipeline folder (it has no model_index.json)")
    return str(folder)


def _accelerate() -> bool:
    """Whether accelerate is installed: asking for low-memory loading without it only prints a warning."""
    from diffusers.utils import is_accelerate_available

    return bool(is_accelerate_available())


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No loading progress bars (diffusers' and transformers') for the block; each setting is put back."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    states = []
    for module in (diffusers_logging, transformers_logging):
        states.append((module, module.is_progress_bar_enabled()))
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in states:
            if enabled:
                module.enable_progress_bar()


def parse_template_args(groups: list[list[str]]) -> list[dict[str, Any]]:
    """``[["brightness", "scale=0.8"], ...]`` -> ``[{"template": "brightness", "scale": 0.8}, ...]``."""
    specs = []
    for name, *pairs in groups:
        spec: dict[str, Any] = {"template": name}
        for pair in pairs:
            key, sep, raw = pair.partition("=")
            if not sep or not key:
                raise UsageError(f"template {name!r}: expected KEY=VALUE, got {pair!r}")
            try:
                spec[key] = json.loads(raw)
            except json.JSONDecodeError:
                spec[key] = raw  # plain strings (paths, words) need no quotes
        specs.append(spec)
    return specs


# -- measurements -------------------------------------------------------------------------------------------
def image_stats(image: Image.Image) -> dict[str, float]:
    """Mean colour, luminance (Rec. 601), high-frequency energy (mean squared Laplacian); [0, 1] units."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    lap = -4 * luma[1:-1, 1:-1] + luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:]
    r, g, b = rgb.reshape(-1, 3).mean(axis=0)
    return {
        "luminance": float(luma.mean()),
        "r": float(r),
        "g": float(g),
        "b": float(b),
        "hf_energy": float((lap**2).mean()),
    }


def contact_sheet(tiles: list[tuple[str, Image.Image]], columns: int = 4, tile: int = 192) -> Image.Image:
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile, rows * (tile + 18)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, image) in enumerate(tiles):
        x, y = (i % columns) * tile, (i // columns) * (tile + 18)
        sheet.paste(image.convert("RGB").resize((tile, tile), Image.NEAREST), (x, y + 18))
        draw.text((x + 4, y + 3), label[:32], fill="black")
    return sheet


# -- torch threads -------------------------------------------------------------------------------------------
#: Denoisers below this many parameters run on one torch thread (see :func:`_threads_for`).
SMALL_MODEL_PARAMS = 50_000_000


def _threads_for(pipe: Any) -> int | None:
    """One torch thread for a small denoiser (the embedded model: 20 steps took 0.5 s on one thread
    and 3.0 s on two on this 2-core machine, where each tiny matrix product paid for waking the second
    thread); ``None`` (torch's default) for a big one, or when ``OMP_NUM_THREADS`` / ``DT_THREADS``
    says how many (``DT_THREADS`` wins)."""
    import os

    raw = os.environ.get("DT_THREADS", "").strip()
    if raw.isdigit():
        return max(1, int(raw))
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if denoiser is None or not hasattr(denoiser, "parameters"):
        return None
    return 1 if sum(p.numel() for p in denoiser.parameters()) < SMALL_MODEL_PARAMS else None


@contextlib.contextmanager
def _threads(pipe: Any) -> Iterator[None]:
    """Run the block on :func:`_threads_for` torch threads; the previous count is put back after."""
    import torch

    threads, previous = _threads_for(pipe), torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _allow_pickle(args: argparse.Namespace) -> bool:
    """``--allow-pickle``; a namespace built by hand without it (tests, scripts) refuses pickles."""
    return vars(args).get("allow_pickle", False) is True


# -- dt generate ---------------------------------------------------------------------------------------------
def _read_job(path: str) -> dict[str, Any]:
    """A JSON or YAML job file as a mapping; a missing or malformed file is a :class:`UsageError`."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"--job {path!r}: cannot read it: {exc.strerror or exc}") from None
    yaml_file = path.endswith((".yaml", ".yml"))
    try:
        if yaml_file:
            import yaml

            job = yaml.safe_load(text) or {}
        else:
            job = json.loads(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError: the parser's message says where
        raise UsageError(f"--job {path!r}: not valid {'YAML' if yaml_file else 'JSON'}: {exc}") from None
    if not isinstance(job, dict):
        raise UsageError(f"--job {path!r}: expected a mapping of fields, got a {type(job).__name__}")
    return job


def _check_job(job: dict[str, Any]) -> None:
    """The job's numbers, checked as the command line checks its flags (``--steps 0`` is refused)."""
    for key in ("steps", "size"):
        value = job.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"job field {key!r}: expected a whole number of at least 1, got {value!r}")
    seed = job.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"job field 'seed': expected a whole number, got {seed!r}")
    for key in ("templates", "negative_templates"):
        if not isinstance(job[key], list):
            raise UsageError(f"job field {key!r}: expected a list of template specs, got {job[key]!r}")


def _job(args: argparse.Namespace) -> dict[str, Any]:
    """The job file's fields, overridden by each flag given on the command line (not by defaults)."""
    job = _read_job(args.job) if args.job else {}
    cli = {
        "prompt": args.prompt or None,
        "base": args.base,
        "steps": args.steps,
        "seed": args.seed,
        "size": args.size,
        "guidance": args.guidance,
        "out": args.out,
    }
    job.update({k: v for k, v in cli.items() if v is not None})
    job.setdefault("seed", 0)
    job.setdefault("out", "out.png")
    templates = job.get("templates") or []
    negatives = job.get("negative_templates") or []
    # One spec on its own (a name or a mapping) is a list of one, as TemplatePipeline takes it.
    job["templates"] = [templates] if isinstance(templates, str | dict) else templates
    job["negative_templates"] = [negatives] if isinstance(negatives, str | dict) else negatives
    _check_job(job)
    job["templates"] = list(job["templates"]) + parse_template_args(args.template)
    job["negative_templates"] = list(job["negative_templates"]) + parse_template_args(args.negative_template)
    return job


def check_templates(host: PluginHost, specs: list[Any]) -> None:
    """Validate each spec against its plugin's ``Inputs`` before the base model loads (seconds saved
    on every typo): imports the plugins named, loads no model. TemplatePipeline checks again."""
    from .errors import TemplateInputError, validate_inputs

    for spec in specs:
        spec = {"template": spec} if isinstance(spec, str) else spec
        if not isinstance(spec, dict) or not isinstance(spec.get("template"), str):
            raise TemplateInputError(
                "<unnamed>", [("template", "each template spec needs a 'template' name", spec)]
            )
        name = spec["template"]
        plugin = host.get("template", name)
        validate_inputs(name, plugin.Inputs, {k: v for k, v in spec.items() if k != "template"})


def _check_size(tp: Any, kwargs: dict[str, Any]) -> None:
    """Refuse a height/width that is not a multiple of the model's (diffusers would round it, warning)."""
    multiple = tp.adapter.size_multiple()
    for key in ("height", "width"):
        value = kwargs.get(key)
        if value is not None and value % multiple:
            lower, upper = value // multiple * multiple, (value // multiple + 1) * multiple
            nearest = " or ".join(str(v) for v in (lower, upper) if v > 0)
            raise UsageError(
                f"--size {value}: this model needs a multiple of {multiple} pixels (try {nearest})"
            )


def generate(args: argparse.Namespace) -> int:
    job = _job(args)
    if job.get("base"):
        check_base(job["base"])
    host = default_host()
    check_templates(host, job["templates"] + job["negative_templates"])  # before the slow model load

    import torch  # after the checks: a misspelt template name is reported without importing torch

    from .pipeline import TemplatePipeline

    base = load_base(job.get("base"), allow_pickle=_allow_pickle(args))
    print(f"base model: {base.description}")
    kwargs = dict(base.call_kwargs)
    if job.get("steps"):
        kwargs["num_inference_steps"] = job["steps"]
    if job.get("size"):
        kwargs["height"] = kwargs["width"] = job["size"]
    if job.get("guidance") is not None:
        kwargs["guidance_scale"] = job["guidance"]
    kwargs.update(job.get("pipeline_kwargs") or {})
    tp = TemplatePipeline(base.pipe, plugins=host)
    _check_size(tp, kwargs)
    base.pipe.set_progress_bar_config(disable=False)
    with _threads(base.pipe):
        image = tp(
            prompt=job.get("prompt") or base.prompts[0],
            templates=job["templates"],
            negative_templates=job["negative_templates"],
            generator=torch.Generator().manual_seed(job["seed"]),
            **kwargs,
        ).images[0]
    out = Path(job["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"wrote {out}")
    return 0


# -- dt demo ------------------------------------------------------------------------------------------
def _demo_prompt(plugin: Any, prompt: str) -> str:
    """A template's demo prompt: its ``demo_prompt`` (a string, or a function of the demo's prompt).

    A trained template controls what the caption leaves open (the brightness of an unnamed
    background, the colour of an uncoloured shape): its demo tile uses a caption without it.
    """
    custom = getattr(plugin, "demo_prompt", None)
    if callable(custom):
        return str(custom(prompt))
    return str(custom) if custom else prompt


def _demo_inputs(plugin: Any, base_image: Image.Image) -> dict[str, Any]:
    """A template's demo inputs: its ``demo_inputs`` (a dict, or a function of the base image)."""
    inputs = getattr(plugin, "demo_inputs", None)
    if callable(inputs):
        return dict(inputs(base_image))
    return dict(inputs or {})


def demo(args: argparse.Namespace, host: PluginHost | None = None) -> int:
    # Imported before the clock starts (torch and diffusers): "Total time" is the demo's own work.
    import torch  # noqa: F401

    from . import pipeline  # noqa: F401

    started = time.perf_counter()
    host = host or default_host()
    if args.base:
        check_base(args.base)  # before the output folder is made
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_base(args.base, allow_pickle=_allow_pickle(args))
    with _threads(base.pipe):
        return _demo(args, host, out, base, started)


def _demo(args: argparse.Namespace, host: PluginHost, out: Path, base: BaseModel, started: float) -> int:
    import torch

    from .pipeline import TemplatePipeline

    kwargs = dict(base.call_kwargs)
    if args.steps:
        kwargs["num_inference_steps"] = args.steps
    tp = TemplatePipeline(base.pipe, plugins=host)
    prompt = base.prompts[0]

    seconds: dict[str, float] = {}

    def render(templates: list[dict[str, Any]], label: str, prompt: str) -> Image.Image:
        start = time.perf_counter()
        image = tp(
            prompt=prompt, templates=templates, generator=torch.Generator().manual_seed(0), **kwargs
        ).images[0]
        seconds[label] = time.perf_counter() - start
        return image

    print(f"base model: {base.description}")
    runs: list[tuple[str, list[dict[str, Any]], str]] = []
    base_image = render([], "base", prompt)
    base_stats = image_stats(base_image)
    tiles = [("base", base_image)]
    Row = tuple[str, dict[str, float], str, dict[str, float]]  # label, stats, prompt, reference stats
    rows: list[Row] = [("base", base_stats, prompt, base_stats)]
    skipped: list[tuple[str, str]] = []
    references = {prompt: base_stats}  # each prompt's image without templates: what Δ is measured from
    names = host.names("template")
    for name in names:
        try:
            plugin = host.get("template", name)
            spec = {"template": name, **_demo_inputs(plugin, base_image)}
            runs.append((name, [spec], _demo_prompt(plugin, prompt)))
        except TemplateError as exc:
            skipped.append((name, str(exc)))
    found = {label: group for label, group, _ in runs}  # the templates whose demo inputs resolved
    for combo in FUSIONS:
        if all(n in found for n in combo):
            specs = [s for n in combo for s in found[n]]
            fused = prompt
            for n in combo:  # each member leaves out what it controls
                fused = _demo_prompt(host.get("template", n), fused)
            runs.append((" + ".join(combo), specs, fused))
    for i, (label, specs, own) in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {label}" + (f" (prompt: {own!r})" if own != prompt else ""))
        if own not in references:
            reference = render([], f"no template: {own}", own)
            references[own] = image_stats(reference)
            tiles.append((f"no template: {own}", reference))
            rows.append((f"no template: {own}", references[own], own, references[own]))
        try:
            image = render(specs, label, own)
        except TemplateError as exc:
            skipped.append((label, str(exc)))
            continue
        image.save(out / f"{label.replace(' + ', '+')}.png")
        tiles.append((label, image))
        rows.append((label, image_stats(image), own, references[own]))
    base_image.save(out / "base.png")
    contact_sheet(tiles).save(out / "contact_sheet.png")
    elapsed = time.perf_counter() - started
    process = _process_seconds()
    steps = kwargs.get("num_inference_steps")
    timing = dict(
        seconds=seconds, elapsed=elapsed, process=process, steps=steps, threads=torch.get_num_threads()
    )
    (out / "report.md").write_text(_report(base.description, prompt, rows, skipped, timing))
    total = f"{elapsed:.1f} s" + (f"; {process:.1f} s since the process started" if process else "")
    print(f"wrote {out / 'contact_sheet.png'} and {out / 'report.md'} ({total})")
    return 0


def _process_seconds() -> float | None:
    """Wall time since this process started (imports included), from ``/proc``; None elsewhere."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            fields = stat.read().rpartition(")")[2].split()
            now = float(uptime.read().split()[0])
        import os

        return now - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in clock ticks
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _report(description: str, prompt: str, rows, skipped, timing: dict[str, Any]) -> str:
    lines = [
        "# Diffusion Templates demo",
        "",
        f"Base model: {description}.",
        "",
        f"Prompt: `{prompt}`",
        "",
        "Measured on each output image (pixel values in [0, 1]; Δ = change from the image of the same "
        "prompt without templates). Trained templates control what the caption leaves open, so their "
        'rows use a caption without it (the prompt column; "-" = the prompt above).',
        "",
        "| run | prompt | luminance | Δ luminance | mean R | mean G | mean B | HF energy | Δ HF energy "
        "| time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    seconds = timing.get("seconds", {})
    for label, s, own, ref in rows:
        took = f"{seconds[label]:.2f} s" if label in seconds else "-"
        shown = "-" if own == prompt else f"`{own}`"
        lines.append(
            f"| {label} | {shown} | {s['luminance']:.3f} | {s['luminance'] - ref['luminance']:+.3f} "
            f"| {s['r']:.3f} "
            f"| {s['g']:.3f} | {s['b']:.3f} | {s['hf_energy']:.4f} "
            f"| {s['hf_energy'] - ref['hf_energy']:+.4f} | {took} |"
        )
    if len(rows) == 1:
        lines += [
            "",
            "No template plugins are installed: `pip install -e plugins/dt-template-<name>` adds one.",
        ]
    for label, why in skipped:
        lines += ["", f"Skipped {label}: {why}"]
    total = f"Total time: {timing['elapsed']:.1f} s"
    if timing.get("process"):
        total += f" ({timing['process']:.1f} s wall time since the process started, imports included)"
    total += "."
    if timing.get("steps"):
        total += f" {timing['steps']} denoising steps per image"
        total += f", {timing['threads']} torch thread(s)." if timing.get("threads") else "."
    lines += ["", total, ""]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    return generate(args) if args.command == "generate" else demo(args)
