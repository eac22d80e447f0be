"""``dt train`` on the embedded shapes model, with a small test-only kv template registered in code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers.configuration_utils import register_to_config
from diffusion_templates import (
    EncodeContext,
    KVCache,
    Template,
    TemplateInputs,
    TemplateModel,
    TemplatePipeline,
)
from diffusion_templates.plugins import PluginHost
from diffusion_templates.testing.snapshot import assert_pipeline_unchanged, pipeline_state
from pydantic import Field, field_validator
from torch import nn

from dt_sdk.train import StaleCacheError, TrainConfig, TrainError, precompute, train

dt_base_shapes = pytest.importorskip("dt_base_shapes")

NAME = "train-test-kv"
ROWS = 8


# -- the test template ---------------------------------------------------------------------------------
class GlowInputs(TemplateInputs):
    scale: float = Field(1.0, ge=0, le=2)
    hint: str | None = None  # a file of the data set: resolved to an absolute path before validation
    weights: str | None = None

    @field_validator("hint")
    @classmethod
    def _existing_file(cls, value: str | None) -> str | None:
        if value is not None and not (Path(value).is_absolute() and Path(value).is_file()):
            raise ValueError(f"no such file: {value}")
        return value


class GlowModel(TemplateModel):
    @register_to_config
    def __init__(self, layers: dict[str, list[int]] | None = None, tokens: int = 2, hidden: int = 16):
        super().__init__()
        self.layers = {name: (heads, dim) for name, (heads, dim) in (layers or {}).items()}
        self.embed = nn.Sequential(nn.Linear(2, hidden), nn.SiLU())
        self.to_kv = nn.ModuleDict(
            {name: nn.Linear(hidden, 2 * tokens * heads * dim) for name, (heads, dim) in self.layers.items()}
        )

    def process_inputs(self, inputs, context=None):
        hint = 0.0 if inputs.hint is None else 1.0
        return {"features": torch.tensor([[inputs.scale, hint]], device=self.device)}

    def forward(self, features: torch.Tensor):
        hidden = self.embed(features)
        keys, values = {}, {}
        for name, (heads, dim) in self.layers.items():
            kv = self.to_kv[name](hidden).view(features.shape[0], self.config.tokens, 2, heads, dim)
            keys[name], values[name] = kv.unbind(dim=2)
        return {"keys": keys, "values": values}


class GlowTemplate(Template):
    Inputs = GlowInputs
    carriers = ("kv",)
    backbones = ("flux2",)

    def new_model(self, context: EncodeContext, **config) -> GlowModel:
        layers = {n: [la.heads, la.head_dim] for n, la in context.adapter.attention_layers().items()}
        return GlowModel(layers=layers, **config)

    def encode(self, inputs: GlowInputs, context: EncodeContext):
        model = GlowModel.from_pretrained(inputs.weights) if inputs.weights else self.new_model(context)
        return model.to(context.device).eval().encode(inputs, context)

    def to_cache(self, representation, context: EncodeContext) -> KVCache:
        return KVCache(keys=representation["keys"], values=representation["values"])


class NoModelTemplate(Template):
    Inputs = GlowInputs
    carriers = ("kv",)

    def encode(self, inputs, context):
        raise NotImplementedError


def make_host() -> PluginHost:
    host = PluginHost()
    host.register("template", NAME, GlowTemplate())
    host.register("template", "no-model", NoModelTemplate())
    return host


# -- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes():
    torch.set_num_threads(1)
    pipe = dt_base_shapes.load_pipeline()
    pipe(prompt="warm up", **{**dt_base_shapes.CALL_KWARGS, "num_inference_steps": 1}, output_type="latent")
    return pipe


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from dt_base_shapes.data import ShapesDataset
    from PIL import Image

    folder = tmp_path_factory.mktemp("data")
    (folder / "images").mkdir()
    (folder / "hints").mkdir()
    lines = []
    for sample in ShapesDataset(ROWS, seed=0):
        image = f"images/{sample.index}.png"
        Image.fromarray(sample.image).save(folder / image)
        inputs = {"scale": round(2 * sample.luminance, 3)}
        if sample.index % 2:
            Image.fromarray(sample.mask).save(folder / f"hints/{sample.index}.png")
            inputs["hint"] = f"hints/{sample.index}.png"
        lines.append(json.dumps({"image": image, "caption": sample.caption, "inputs": inputs}))
    (folder / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def config(data: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(template=NAME, data=data, out=out, steps=3, batch=4, lr=1e-2, seed=0, log_every=0)
    return TrainConfig(**{**settings, **overrides})


def run_train(cfg: TrainConfig, shapes, **kwargs) -> dict:
    return train(cfg, pipe=shapes, call_kwargs=dict(dt_base_shapes.CALL_KWARGS), plugins=make_host(),
                 progress=False, **kwargs)


# -- (a) train, save, reload, inject ----------------------------------------------------------------------
def test_trains_saves_reloads_and_injects(shapes, data, tmp_path):
    before = pipeline_state(shapes)
    flags = [p.requires_grad for p in shapes.transformer.parameters()]
    out = tmp_path / "glow"
    record = run_train(config(data, out, steps=6), shapes)
    losses = record["losses"]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "training.json"
    ]
    saved = json.loads((out / "training.json").read_text())
    assert saved["losses"] == losses and saved["config"]["template"] == NAME and saved["versions"]["torch"]
    assert (tmp_path / "glow.stage1" / "index.json").is_file()
    # the base pipeline is exactly as before: weights, hooks, requires_grad, modes
    assert_pipeline_unchanged(before, shapes)
    assert [p.requires_grad for p in shapes.transformer.parameters()] == flags
    assert not shapes.transformer.training

    # reload: identical parameters, and different from an untrained model (training moved them)
    loaded = GlowModel.from_pretrained(out)
    host = make_host()
    ctx = EncodeContext(pipe=shapes, adapter=TemplatePipeline(shapes, plugins=host).adapter, template=NAME)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = host.get("template", NAME).new_model(ctx)
    assert loaded.state_dict().keys() == fresh.state_dict().keys()
    assert any(not torch.equal(loaded.state_dict()[k], fresh.state_dict()[k]) for k in fresh.state_dict())

    # inject through a pipeline call: changes the output; the pipeline is bit-identical afterwards
    tp = TemplatePipeline(shapes, plugins=host)
    kwargs = dict(prompt=dt_base_shapes.PROMPTS[0], **dt_base_shapes.CALL_KWARGS, output_type="latent")
    kwargs["num_inference_steps"] = 4
    plain = tp(generator=torch.Generator().manual_seed(0), **kwargs).images
    spec = {"template": NAME, "scale": 1.5, "weights": str(out)}
    templated = tp(generator=torch.Generator().manual_seed(0), templates=[spec], **kwargs).images
    assert (templated - plain).abs().max() > 1e-4
    assert torch.equal(tp(generator=torch.Generator().manual_seed(0), **kwargs).images, plain)
    assert_pipeline_unchanged(before, shapes)


def test_loss_goes_down_on_a_fixed_batch(shapes, data, tmp_path):
    """Batch = the whole data set, so every step sees the same rows (with fresh noise each step)."""
    record = run_train(config(data, tmp_path / "fit", steps=12, batch=ROWS, lr=3e-2), shapes, stages="one")
    losses = record["losses"]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses


# -- (b) split training equals one pass ------------------------------------------------------------------
def test_split_and_one_stage_give_the_same_losses(shapes, data, tmp_path):
    cfg = config(data, tmp_path / "split", steps=2, caption_dropout=0.5)
    precompute(cfg, pipe=shapes, call_kwargs=dict(dt_base_shapes.CALL_KWARGS), plugins=make_host(),
               progress=False)
    split = run_train(cfg, shapes, stages="train")
    one = run_train(config(data, tmp_path / "one", steps=2, caption_dropout=0.5), shapes, stages="one")
    assert not (tmp_path / "one.stage1").exists()  # one pass writes no cache
    assert split["losses"][0] == pytest.approx(one["losses"][0], abs=1e-6, rel=0)
    assert split["losses"] == pytest.approx(one["losses"], abs=1e-5, rel=0)


# -- (c) gradient checkpointing -----------------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(shapes, data, tmp_path, monkeypatch):
    import torch.utils.checkpoint as ckpt

    from dt_sdk.train.session import checkpointing, frozen, open_session
    from dt_sdk.train.stages import encode_row, step_loss

    checkpointed = []
    original = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: checkpointed.append(1) or original(*a, **k))

    before = pipeline_state(shapes)
    cfg = config(data, tmp_path / "gc")
    kwargs = dict(dt_base_shapes.CALL_KWARGS)
    session = open_session(cfg, pipe=shapes, call_kwargs=kwargs, plugins=make_host())
    model = session.new_model()
    features = [encode_row(session, model, i) for i in range(4)]
    empty = session.objective.encode_caption("")
    results = []
    for enabled in (False, True):
        model.zero_grad(set_to_none=True)
        with frozen(shapes), checkpointing(session.denoiser, enabled):
            loss = step_loss(session, model, features, 0, empty, backward=lambda loss: loss.backward())
        assert bool(checkpointed) == enabled  # every block was checkpointed exactly when asked
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads_a)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert not shapes.transformer.gradient_checkpointing
    assert_pipeline_unchanged(before, shapes)  # also: no _gradient_checkpointing_func left behind


def test_pipeline_restored_when_training_fails(shapes, data, tmp_path, monkeypatch):
    from dt_sdk.train.objectives import Flux2FlowMatching

    before = pipeline_state(shapes)
    flags = [p.requires_grad for p in shapes.transformer.parameters()]
    original = Flux2FlowMatching.loss
    calls = []

    def failing(self, denoiser, batch, draw):
        calls.append(1)
        if len(calls) == 2:  # mid-run, inside the injection, with checkpointing on
            raise KeyboardInterrupt
        return original(self, denoiser, batch, draw)

    monkeypatch.setattr(Flux2FlowMatching, "loss", failing)
    with pytest.raises(KeyboardInterrupt):
        run_train(config(data, tmp_path / "fail", gradient_checkpointing=True), shapes, stages="one")
    assert len(calls) == 2
    assert [p.requires_grad for p in shapes.transformer.parameters()] == flags
    assert not shapes.transformer.gradient_checkpointing
    assert_pipeline_unchanged(before, shapes)


# -- (d) stale stage-1 cache ---------------------------------------------------------------------------------
def test_stale_stage1_cache_is_refused(shapes, data, tmp_path):
    cfg = config(data, tmp_path / "stale", steps=1, max_rows=4)
    precompute(cfg, pipe=shapes, call_kwargs=dict(dt_base_shapes.CALL_KWARGS), plugins=make_host(),
               progress=False)
    other = config(data, tmp_path / "stale", steps=1, max_rows=4, model_config={"tokens": 3})
    with pytest.raises(StaleCacheError, match="template"):
        run_train(other, shapes, stages="train")
    with pytest.raises(StaleCacheError, match="encoding settings"):
        run_train(config(data, tmp_path / "stale", steps=1, max_rows=4, size=32), shapes)
    with pytest.raises(StaleCacheError, match="data set"):
        run_train(config(data, tmp_path / "stale", steps=1, max_rows=5), shapes)


def test_a_stale_stage1_cache_is_recomputed_when_asked(shapes, data, tmp_path):
    cfg = config(data, tmp_path / "stale", steps=1, max_rows=4)
    precompute(cfg, pipe=shapes, call_kwargs=dict(dt_base_shapes.CALL_KWARGS), plugins=make_host(),
               progress=False)
    other = config(data, tmp_path / "stale", steps=1, max_rows=5)  # another data set: stale
    record = run_train(other, shapes, stale="recompute")
    assert len(record["losses"]) == 1
    with pytest.raises(StaleCacheError):  # "train" never computes stage 1
        run_train(cfg, shapes, stages="train", stale="recompute")


# -- (e) bad data ------------------------------------------------------------------------------------------
def test_bad_rows_are_reported_before_training(shapes, data, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "images").symlink_to(data / "images")
    rows = [
        {"image": "images/0.png", "caption": "ok", "inputs": {"scale": 1.0}},
        {"image": "images/missing.png", "caption": "x", "inputs": {}},
        {"image": "images/1.png", "caption": "x", "inputs": {"scale": 5}},
        {"image": "images/2.png", "caption": "x", "inputs": {"hint": "hints/none.png"}},
        {"image": "images/3.png", "caption": 3, "inputs": {"colour": 1}},
    ]
    (bad / "samples.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    with pytest.raises(TrainError) as info:
        run_train(config(bad, tmp_path / "out"), shapes)
    message = str(info.value)
    assert f"template {NAME!r}" in message
    assert "row 2: image 'images/missing.png' does not exist" in message
    assert "row 3: template 'train-test-kv', field 'scale'" in message
    assert "row 4: template 'train-test-kv', field 'hint'" in message
    assert "row 5: 'caption' must be a string" in message and "field 'colour'" in message
    assert "row 6: not JSON" in message
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.stage1").exists()


def test_template_without_a_model_and_unsupported_backbones(shapes, data, tmp_path, flux_pipe_or_skip):
    with pytest.raises(TrainError, match="template 'no-model' has no trainable Template model"):
        run_train(config(data, tmp_path / "x", template="no-model"), shapes)
    if flux_pipe_or_skip is not None:
        host = PluginHost()
        host.register("template", "any-kv", type("AnyKV", (GlowTemplate,), {"backbones": ("*",)})())
        cfg = config(data, tmp_path / "y", template="any-kv")
        with pytest.raises(TrainError, match="not supported yet; supported: \\['flux2'\\]"):
            train(cfg, pipe=flux_pipe_or_skip, plugins=host, progress=False)


@pytest.fixture
def flux_pipe_or_skip():
    from diffusion_templates.testing.tiny import TINY_PIPELINES

    return TINY_PIPELINES["flux"].build()


# -- (f) command line --------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["dt_sdk.train"], ["diffusion_templates", "train"]])
def test_help(command, child_env):
    result = subprocess.run([sys.executable, "-m", *command, "--help"], capture_output=True, text=True,
                            env=child_env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--gradient-checkpointing" in result.stdout and "--stage" in result.stdout


@pytest.fixture
def default_host_with_no_model():
    from diffusion_templates.plugins import default_host, reset_default_host

    reset_default_host()
    default_host().register("template", "no-model", NoModelTemplate())
    yield
    reset_default_host()


def test_cli_errors_are_one_liners(tmp_path, capsys, default_host_with_no_model):
    from dt_sdk.train.cli import main

    base = ["--data", str(tmp_path), "--out", str(tmp_path / "o")]
    for extra, expected in (
        (["--template", "x", "--steps", "0"], "dt train: error: --steps: Input should be greater"),
        (["--template", "x", "--model-config", "[1]"], "dt train: error: --model-config must be a JSON"),
        (["--template", "no-such-template"], "dt train: error: "),
        (["--template", "no-model"], "dt train: error: template 'no-model' has no trainable"),
    ):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(expected) and len(err.strip().splitlines()) == 1, err


# -- (g) accelerate launch ----------------------------------------------------------------------------------
def test_accelerate_launch(data, tmp_path, child_env):
    """``accelerate launch --cpu -m dt_sdk.train``, the test template installed through an entry point."""
    pytest.importorskip("accelerate")
    site = tmp_path / "site"
    info = site / "dt_train_test-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: dt-train-test\nVersion: 0.0.1\n"
        "Requires-Dist: diffusion-templates>=0.1,<0.2\nKeywords: dt-carrier:kv,dt-backbone:flux2\n"
    )
    entry_points = f"[diffusion_templates.templates]\n{NAME} = test_train:GlowTemplate\n"
    (info / "entry_points.txt").write_text(entry_points)
    env = {**child_env, "PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).parent)])}
    out = tmp_path / "acc"
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "dt_sdk.train", "--template", NAME, "--data", str(data), "--out", str(out),
         "--steps", "2", "--batch", "2", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 2 and record["processes"] == 1
    assert time.perf_counter() - started < 120


def test_a_text_encoder_that_needs_other_call_settings_gets_a_clear_error(shapes, data, tmp_path):
    """The shapes text encoder has 2 layers; FLUX.2's default picks layers (9, 18, 27)."""

    def bare(cfg: TrainConfig) -> dict:  # the pipeline without the base model's call settings
        return train(cfg, pipe=shapes, call_kwargs={}, plugins=make_host(), progress=False)

    with pytest.raises(TrainError, match="--call-kwargs"):
        bare(config(data, tmp_path / "out"))
    record = bare(config(data, tmp_path / "out2", steps=1, call_kwargs={"text_encoder_out_layers": [1, 2]}))
    assert len(record["losses"]) == 1
