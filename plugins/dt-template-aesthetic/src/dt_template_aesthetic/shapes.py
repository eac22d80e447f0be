"""Train the ``shapes-high-key`` LoRA on the ``dt-base-shapes`` demo model: the LoRA file ``dt demo`` shows.

    python -m dt_template_aesthetic.shapes             # -> weights/shapes-high-key.safetensors
    python -m dt_template_aesthetic.shapes --measure   # with vs without it on 16 held-out captions

The "aesthetic" is a high-key look: whatever background the caption asks for, the picture has a plain
white backdrop (a white shape gets a black one), the shape itself as the caption says. Every image of the
data set (``dt_base_shapes.data``, seeded) is drawn again with the same shape, colour, position, size and
jitter on that backdrop, and keeps its usual caption. A pixel statistic measures it: the mean luminance of
the background (the pixels certainly away from the shape) and how often its nearest palette colour is the
backdrop; ``dt_base_shapes.evaluate`` checks that the shape, its colour, position and size survive.

(A pastel look, every image blended 45 % toward white, was tried first and is not learnable here: the
embedded model's tiny VAE, trained on the eight palette colours, does not reproduce pastel colours (a
round trip through it is off by 0.13 on average, against 0.009 for the palette images; see
docs/zoo/aesthetic.md).

The model trained is the LoRA itself: a training-only template (``LoraTemplate``, which :func:`make_host`
registers in code on the ``PluginHost`` handed to ``dt_sdk.train``) whose
``LoraModel`` holds the A/B factors (rank 4 on every Linear layer of the denoiser, or the attention
projections only) and whose ``to_cache`` returns them as a ``LoraCache``, injected by the host's lora
carrier as the ``aesthetic`` template does. Training is the backbone's own flow-matching loss with the
base model frozen. The factors are then written as a diffusers-format LoRA file
(``transformer.<module>.lora_A.weight`` / ``lora_B.weight``, scaling 1), which ``aesthetic`` (and
diffusers' ``load_lora_weights``) reads.

``dt-base-shapes`` and ``dt-sdk`` are imported here only (``pip install dt-template-aesthetic[train]``).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

WEIGHTS = Path(__file__).parent / "weights"
SHIPPED = WEIGHTS / "shapes-high-key.safetensors"
TEMPLATE = "aesthetic-shapes-lora"  # the training-only template's name (never installed)
#: The denoiser's Linear modules the LoRA may target (suffixes of module paths), by name:
#: ``attention``: the attention projections of every block (image stream of the double blocks; the
#: fused qkv+mlp projection and the output of the single blocks); ``all``: every Linear layer.
TARGET_SETS: dict[str, tuple[str, ...] | None] = {
    "attention": (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.to_qkv_mlp_proj", "attn.to_out",
    ),
    "all": None,
}
#: The recipe of the shipped file (196 s on one CPU core: stage 1 22 s, 0.14 s per step).
RECIPE: dict[str, Any] = {
    "n": 2000, "steps": 1200, "batch": 8, "lr": 3e-3, "rank": 4, "targets": "all", "seed": 0,
    "caption_dropout": 0.15,
}  # fmt: skip


# -- the high-key look and its measures -------------------------------------------------------------------
def backdrop(attrs) -> tuple[str, ...]:
    """The look's background for a caption's attributes: white, or black behind a white shape."""
    return ("black",) if attrs.color == "white" else ("white",)


def high_key(attrs, rng=None, index: int = -1):
    """The sample of ``attrs`` (jitter from ``rng``) drawn on the look's backdrop (a ``Sample``)."""
    import dataclasses

    from dt_base_shapes.data import render

    return render(dataclasses.replace(attrs, background=backdrop(attrs)), rng, index)


def backdrop_stats(images: np.ndarray, attrs: list) -> dict[str, float]:
    """Over the background pixels (certainly away from the shape, ``dt_base_shapes.evaluate``'s regions):
    mean luminance (Rec. 601), and the fraction of images whose every background region has the look's
    backdrop as nearest palette colour (``backdrop``), or keeps the caption's colours (``caption``)."""
    from dt_base_shapes.evaluate import expected_masks, nearest_color

    x = np.asarray(images, dtype=np.float64)
    if x.max() > 1.5:
        x = x / 255.0
    luma, is_backdrop, is_caption = [], [], []
    for image, a in zip(x, attrs, strict=True):
        _, regions = expected_masks(a)
        away = np.any(np.stack(regions), axis=0)
        luma.append(float((image[away] @ np.array([0.299, 0.587, 0.114])).mean()))
        colors = tuple(nearest_color(image[r].mean(axis=0)) for r in regions)
        is_backdrop.append(all(c == backdrop(a)[0] for c in colors))
        is_caption.append(colors == tuple(a.background))
    return {
        "background_luminance": float(np.mean(luma)),
        "backdrop": float(np.mean(is_backdrop)),
        "caption": float(np.mean(is_caption)),
    }


# -- the training-only template: the LoRA factors as a Template model ---------------------------------
@functools.cache
def _template_classes():
    """Built on first use (imports torch, diffusers and the host)."""
    import torch
    from diffusers.configuration_utils import register_to_config

    from diffusion_templates import EncodeContext, LoraCache, Template, TemplateInputs, TemplateModel

    class LoraInputs(TemplateInputs):
        """No inputs: the look is the LoRA."""

    class LoraModel(TemplateModel):
        """A rank-``rank`` LoRA: per module, A (rank, in) and B (out, rank); B starts at zero."""

        @register_to_config
        def __init__(self, layers: dict[str, list[int]] | None = None, rank: int = 4):
            super().__init__()
            self.modules_ = {name: (int(i), int(o)) for name, (i, o) in (layers or {}).items()}
            self.down = torch.nn.ParameterDict()
            self.up = torch.nn.ParameterDict()
            for name, (fan_in, fan_out) in self.modules_.items():
                key = name.replace(".", "__")
                self.down[key] = torch.nn.Parameter(torch.randn(rank, fan_in) / fan_in**0.5)
                self.up[key] = torch.nn.Parameter(torch.zeros(fan_out, rank))

        def process_inputs(self, inputs, context=None):
            return {}

        def forward(self) -> dict[str, dict[str, torch.Tensor]]:
            return {
                "down": {n: self.down[n.replace(".", "__")] for n in self.modules_},
                "up": {n: self.up[n.replace(".", "__")] for n in self.modules_},
            }

    class LoraTemplate(Template):
        Inputs = LoraInputs
        carriers = ("lora",)
        backbones = ("flux2",)

        def new_model(
            self, context: EncodeContext, rank: int = RECIPE["rank"], targets: str = RECIPE["targets"]
        ) -> LoraModel:
            return LoraModel(layers=target_modules(context.adapter.denoiser, targets), rank=rank)

        def encode(self, inputs, context: EncodeContext):
            raise NotImplementedError("training only: apply the exported LoRA with the 'aesthetic' template")

        def to_cache(self, representation, context: EncodeContext) -> LoraCache:
            return LoraCache(
                down=representation["down"], up=representation["up"], template=context.template
            )

    return LoraInputs, LoraModel, LoraTemplate


def target_modules(denoiser, targets: str = RECIPE["targets"]) -> dict[str, list[int]]:
    """``{module path: [in, out]}`` of the denoiser's Linear layers in the set ``targets``."""
    import torch

    suffixes = TARGET_SETS[targets]
    return {
        name: [m.in_features, m.out_features]
        for name, m in denoiser.named_modules()
        if isinstance(m, torch.nn.Linear) and (suffixes is None or name.endswith(suffixes))
    }


def make_host():
    """A ``PluginHost`` with the training-only template registered in code."""
    from diffusion_templates.plugins import PluginHost

    host = PluginHost()
    host.register("template", TEMPLATE, _template_classes()[2]())
    return host


def export_lora(model_dir: str | Path, out: str | Path) -> Path:
    """The trained factors (``save_pretrained`` folder) as a diffusers-format LoRA safetensors file."""
    from safetensors.torch import save_file

    LoraModel = _template_classes()[1]
    model = LoraModel.from_pretrained(str(model_dir))
    factors = model.forward()
    tensors = {}
    for name in sorted(factors["down"]):
        tensors[f"transformer.{name}.lora_A.weight"] = factors["down"][name].detach().float().contiguous()
        tensors[f"transformer.{name}.lora_B.weight"] = factors["up"][name].detach().float().contiguous()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "pt",
        "dt_recipe": "dt_template_aesthetic.shapes",
        "dt_base": "dt-base-shapes",
        "dt_look": "high-key: a white backdrop whatever the caption says (black behind a white shape)",
    }
    save_file(tensors, str(out), metadata=meta)
    out.chmod(0o644)
    return out


# -- data set and training ----------------------------------------------------------------------------------
def build_dataset(out: str | Path, n: int = RECIPE["n"], seed: int = 0) -> Path:
    """Write ``n`` high-key rows (PNG images, ``samples.jsonl``) to ``out``; returns the folder."""
    from dt_base_shapes.data import ShapesDataset
    from PIL import Image

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    data = ShapesDataset(n, seed=seed)
    lines = []
    for i in range(n):
        attrs, rng = data.attributes(i)  # the same draw and jitter as data[i], another backdrop
        name = f"images/{i:05d}.png"
        Image.fromarray(high_key(attrs, rng, i).image).save(out / name)
        lines.append(json.dumps({"image": name, "caption": attrs.caption, "inputs": {}}))
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return out


def default_data_dir() -> Path:
    """Where the data set and the stage-1 cache go by default (outside the package: they never ship)."""
    from dt_base_shapes.recipes import data_dir

    return data_dir("aesthetic-high-key")


def train_shapes(
    out: str | Path = SHIPPED,
    *,
    data: str | Path | None = None,
    steps: int = RECIPE["steps"],
    batch: int = RECIPE["batch"],
    lr: float = RECIPE["lr"],
    rank: int = RECIPE["rank"],
    targets: str = RECIPE["targets"],
    seed: int = RECIPE["seed"],
    n: int = RECIPE["n"],
    caption_dropout: float = RECIPE["caption_dropout"],
    base: str | None = None,
    pipe: Any = None,
    log=print,
) -> dict[str, Any]:
    """Build the data set (once, in ``data``), train the LoRA, export it to ``out`` (a .safetensors file).

    The ``dt train`` folder (``config.json``, the factors, ``training.json``) goes to ``<data>/model``;
    ``<out>.json`` gets the training record without the per-step losses. Returns the record.
    """
    from dt_base_shapes.recipes import train_template

    out = Path(out)
    data = Path(data) if data is not None else default_data_dir()
    model_dir = data / "model"
    record = train_template(
        TEMPLATE, build_dataset, model_dir, data=data, n=n, seed=seed, log=log, pipe=pipe,
        plugins=make_host(), steps=steps, batch=batch, lr=lr, base=base, caption_dropout=caption_dropout,
        model_config={"rank": rank, "targets": targets}, log_every=50,
    )
    export_lora(model_dir, out)
    summary = {k: v for k, v in record.items() if k != "losses"}
    summary["recipe"] = {"n": n, "look": "high-key", "rank": rank, "targets": targets}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    log(
        f"shapes-high-key: trained {record['steps']} steps in {record['seconds']['total']:.0f} s "
        f"(stage 1 {record['seconds']['stage1']:.0f} s, {record['seconds']['per_step']:.2f} s/step) -> {out}"
    )
    return record


# -- measuring ------------------------------------------------------------------------------------------
def measure(
    lora: str | Path = SHIPPED,
    *,
    n: int = 16,
    steps: int | None = None,
    settings: tuple[tuple[str, float, bool], ...] = (
        ("cond only, weight 0.25", 0.25, False),
        ("cond only, weight 0.5", 0.5, False),
        ("cond only, weight 1", 1.0, False),
        ("both branches, weight 1", 1.0, True),
    ),
    seed: int = 0,
    log=print,
) -> dict[str, Any]:
    """Generate ``n`` held-out captions without and with the LoRA (``aesthetic`` template, CFG as the
    model's call settings); measure the backdrop and the shapes scoring."""
    import dt_base_shapes
    import torch
    from dt_base_shapes import evaluate

    from diffusion_templates import TemplatePipeline

    pipe = dt_base_shapes.load_pipeline()
    kwargs = dict(dt_base_shapes.CALL_KWARGS)
    if steps:
        kwargs["num_inference_steps"] = steps
    attrs = evaluate.heldout_captions(n)
    classifier = evaluate.train_shape_classifier()
    tp = TemplatePipeline(pipe)

    def run(templates, negative) -> np.ndarray:
        images = []
        for i, a in enumerate(attrs):
            out = tp(
                prompt=a.caption, templates=templates, negative_templates=negative,
                generator=torch.Generator().manual_seed(seed + i), output_type="np", **kwargs,
            )
            images.append(np.asarray(out.images[0]))
        return np.stack(images)

    def row(images: np.ndarray) -> dict[str, Any]:
        return {**backdrop_stats(images, attrs), **evaluate.score(images, attrs, classifier)["accuracy"]}

    t0 = time.perf_counter()
    rows = {"high-key references (ceiling)": row(np.stack([high_key(a).image for a in attrs]))}
    base = run([], [])
    rows["without the LoRA"] = row(base)
    for label, weight, both in settings:
        spec = {"template": "aesthetic", "loras": [{"path": str(lora), "weight": weight}]}
        images = run([spec], [spec] if both else [])
        rows[label] = {**row(images), "mae_to_base": float(np.abs(images - base).mean())}
    seconds = time.perf_counter() - t0
    result = {"n": n, "steps": kwargs["num_inference_steps"], "rows": rows, "seconds": seconds}
    for label, r in rows.items():
        log(f"{label}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(SHIPPED), help="the LoRA file to write (.safetensors)")
    parser.add_argument("--data", default=None, help="data set + stage-1 cache folder (default: a temp dir)")
    for name in ("steps", "batch", "rank", "seed", "n"):
        parser.add_argument(f"--{name}", type=int, default=RECIPE[name])
    parser.add_argument("--lr", type=float, default=RECIPE["lr"])
    parser.add_argument("--targets", choices=sorted(TARGET_SETS), default=RECIPE["targets"])
    parser.add_argument("--caption-dropout", type=float, default=RECIPE["caption_dropout"])
    parser.add_argument(
        "--base", default=None, help="diffusers folder of the base model (default: dt-base-shapes)"
    )
    parser.add_argument("--measure", action="store_true", help="measure --out instead of training it")
    parser.add_argument("--measure-n", type=int, default=16)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.measure:
        result = measure(args.out, n=args.measure_n)
        Path(args.out).with_suffix(".measured.json").write_text(json.dumps(result, indent=1, default=float))
        return
    train_shapes(
        args.out, data=args.data, steps=args.steps, batch=args.batch, lr=args.lr, rank=args.rank,
        seed=args.seed, n=args.n, caption_dropout=args.caption_dropout, base=args.base,
        targets=args.targets,
    )


if __name__ == "__main__":
    main()
