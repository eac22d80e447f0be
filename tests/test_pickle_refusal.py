"""No pickle is loaded unless the user asks for it: ``--allow-pickle`` / ``allow_pickle=True``.

A tiny FLUX.2 klein pipeline saved with ``safe_serialization=False`` (diffusers then writes its
transformer and VAE as ``diffusion_pytorch_model.bin``; transformers 5 writes safetensors whatever
it is told) is refused by every loader, naming the pickle files, before ``from_pretrained`` is even
called; with the flag it loads and gives exactly the saved pipeline's output. The same pipeline saved
with safetensors loads with no flag, and ``use_safetensors=True`` is what the loaders pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, Flux2KleinPipeline, Flux2Transformer2DModel

from diffusion_templates import cli, models
from diffusion_templates.demo import load_base
from diffusion_templates.pickle_guard import PickleWeightsError, from_pretrained, pickle_weights
from diffusion_templates.testing.tiny import TINY_PIPELINES, tiny_call_kwargs
from diffusion_templates.value_kv import ValueKVModel

PICKLES = "transformer/diffusion_pytorch_model.bin, vae/diffusion_pytorch_model.bin"
SEEDS = [0, 2]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pipe = TINY_PIPELINES["flux2_klein"].build()
    root = tmp_path_factory.mktemp("pickle_refusal")
    pipe.save_pretrained(root / "pickled", safe_serialization=False)
    pipe.save_pretrained(root / "safe")
    return {"pipe": pipe, "pickled": root / "pickled", "safe": root / "safe", "root": root}


def _output(pipe, seed: int) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a red circle", **tiny_call_kwargs("flux2_klein", seed=seed, output_type="np")).images


def assert_same_pipeline(loaded, original, seed: int) -> None:
    """Every weight bit-identical; outputs equal up to float rounding (weights read through mmap from
    safetensors can take other kernel paths than the in-memory originals: measured 1.7e-6 here)."""
    for name in ("transformer", "vae", "text_encoder"):
        want = getattr(original, name).state_dict()
        got = getattr(loaded, name).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    np.testing.assert_allclose(_output(loaded, seed), _output(original, seed), rtol=0, atol=1e-5)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Records every ``DiffusionPipeline.from_pretrained`` (and subclass) call's keyword arguments."""
    seen: list[dict] = []
    original = DiffusionPipeline.from_pretrained.__func__

    def spy(cls, source, **kwargs):
        seen.append(kwargs)
        return original(cls, source, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(spy))
    return seen


def test_the_fixture_really_holds_pickles(saved) -> None:
    assert (saved["pickled"] / "transformer" / "diffusion_pytorch_model.bin").is_file()
    assert not list((saved["pickled"] / "transformer").glob("*.safetensors"))
    assert pickle_weights(saved["pickled"]) == PICKLES.split(", ")
    assert pickle_weights(saved["safe"]) == []


def test_base_folder_with_pickles_is_refused_before_loading(saved, calls) -> None:
    with pytest.raises(PickleWeightsError) as info:
        load_base(str(saved["pickled"]))
    message = str(info.value)
    assert f"contains pickle weights ({PICKLES}); pass --allow-pickle" in message
    assert str(saved["pickled"]) in message
    assert calls == []  # refused before diffusers saw the folder


@pytest.mark.parametrize("seed", SEEDS)
def test_allow_pickle_loads_the_same_pipeline(saved, calls, seed) -> None:
    base = load_base(str(saved["pickled"]), allow_pickle=True)
    assert "use_safetensors" not in calls[-1]  # diffusers' own default: .bin when there is no safetensors
    assert_same_pipeline(base.pipe, saved["pipe"], seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_safetensors_load_without_the_flag(saved, calls, seed) -> None:
    base = load_base(str(saved["safe"]))
    assert calls[-1]["use_safetensors"] is True
    assert_same_pipeline(base.pipe, saved["pipe"], seed)


def _job(tmp_path: Path, **extra) -> str:
    job = tmp_path / "job.json"
    call = {"max_sequence_length": 32, "text_encoder_out_layers": [1, 2]}
    job.write_text(json.dumps({"pipeline_kwargs": call, **extra}))
    return str(job)


def test_dt_generate_refuses_pickles_and_takes_them_with_the_flag(saved, tmp_path, capsys) -> None:
    out = tmp_path / "out.png"
    argv = ["generate", "--base", str(saved["pickled"]), "--steps", "2", "--size", "64", "--out", str(out)]
    # a job file cannot allow pickles: only the person running the command can
    assert cli.main([*argv, "--job", _job(tmp_path, allow_pickle=True)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"dt: error: {saved['pickled']} contains pickle weights ({PICKLES}); pass --allow-pickle"
    )
    assert not out.exists()

    assert cli.main([*argv, "--job", _job(tmp_path), "--allow-pickle"]) == 0
    assert out.is_file()


def test_dt_demo_refuses_pickles(saved, tmp_path, capsys) -> None:
    code = cli.main(
        ["demo", "--base", str(saved["pickled"]), "--steps", "2", "--out", str(tmp_path / "demo")]
    )
    assert code == 2
    assert f"contains pickle weights ({PICKLES})" in capsys.readouterr().err


def test_model_loader_refuses_pickles_unless_allowed(saved) -> None:
    folder = saved["pickled"] / "transformer"
    loader = models.TemplateModelLoader()
    with pytest.raises(PickleWeightsError, match=r"contains pickle weights \(diffusion_pytorch_model.bin\)"):
        loader.load(Flux2Transformer2DModel, folder)
    with pytest.raises(PickleWeightsError):  # the caller's own loader function is guarded too
        loader.load(Flux2Transformer2DModel, folder, loader=Flux2Transformer2DModel.from_pretrained)
    model = loader.load(Flux2Transformer2DModel, folder, allow_pickle=True)
    expected = saved["pipe"].transformer.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in model.state_dict().items())
    # the unpickled model is kept under its own key: asking without the flag is still refused
    with pytest.raises(PickleWeightsError):
        loader.load(Flux2Transformer2DModel, folder)
    safe = loader.load(Flux2Transformer2DModel, saved["safe"] / "transformer")
    assert all(torch.equal(t, expected[k]) for k, t in safe.state_dict().items())
    assert loader.stats.loads == 2


def test_template_model_weights_as_pickles_are_refused(tmp_path) -> None:
    """What the trained kv templates load (trained.py -> models.load) never comes from a pickle."""
    model = ValueKVModel(layers={"double_0": [2, 16]})
    model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    model.save_pretrained(tmp_path / "safe")
    assert pickle_weights(tmp_path / "pickled") == ["diffusion_pytorch_model.bin"]
    with pytest.raises(PickleWeightsError, match="pass --allow-pickle"):
        models.TemplateModelLoader().load(ValueKVModel, tmp_path / "pickled")
    loaded = models.TemplateModelLoader().load(ValueKVModel, tmp_path / "safe")
    assert all(torch.equal(t, model.state_dict()[k]) for k, t in loaded.state_dict().items())


def test_the_shapes_base_model_loader_refuses_pickles(saved, calls) -> None:
    from dt_base_shapes import load_pipeline

    with pytest.raises(PickleWeightsError, match=r"contains pickle weights \(transformer/"):
        load_pipeline(saved["pickled"])
    assert calls == []
    pipe = load_pipeline(saved["pickled"], allow_pickle=True)
    assert isinstance(pipe, Flux2KleinPipeline)
    assert_same_pipeline(pipe, saved["pipe"], 1)


def test_dt_train_base_refuses_pickles(saved, calls) -> None:
    import argparse

    from dt_sdk.train.cli import add_arguments
    from dt_sdk.train.config import TrainConfig
    from dt_sdk.train.session import load_base as train_load_base

    with pytest.raises(PickleWeightsError, match="pass --allow-pickle"):
        train_load_base(str(saved["pickled"]))
    assert calls == []
    pipe, _ = train_load_base(str(saved["pickled"]), allow_pickle=True)
    assert isinstance(pipe, Flux2KleinPipeline)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    required = ["--template", "t", "--data", "d", "--out", "o"]
    assert parser.parse_args([*required, "--allow-pickle"]).allow_pickle is True
    assert parser.parse_args(required).allow_pickle is False
    assert TrainConfig(template="t", data=Path("d"), out=Path("o")).allow_pickle is False


def test_only_weights_a_loader_would_read_count(saved, tmp_path) -> None:
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(saved["safe"], mixed)
    # a pickle beside safetensors is never read with use_safetensors=True; nor is a stray top-level .bin
    shutil.copy(saved["pickled"] / "vae" / "diffusion_pytorch_model.bin", mixed / "vae")
    (mixed / "training_args.bin").write_bytes(b"not read by from_pretrained")
    assert pickle_weights(mixed) == []
    for name in ("model.pt", "weights.ckpt", "shard-00001-of-00002.bin", "model.PTH"):
        single = tmp_path / name.replace(".", "_")
        single.mkdir()
        (single / "config.json").write_text("{}")
        (single / name).write_bytes(b"pickle")
        assert pickle_weights(single) == [name]


def test_a_hub_repository_with_only_pickles_gets_the_same_message() -> None:
    """For a hub id diffusers refuses before downloading; its OSError becomes the named refusal."""

    def hub(source, **kwargs):
        assert kwargs["use_safetensors"] is True
        raise OSError("Could not find the necessary `safetensors` weights in {...} (variant=None)")

    with pytest.raises(
        PickleWeightsError, match=r"org/pickles-only has no safetensors weights.*--allow-pickle"
    ):
        from_pretrained(hub, "org/pickles-only")
    with pytest.raises(OSError, match="connection refused"):  # other errors are not reworded

        def offline(source, **kwargs):
            raise OSError("connection refused")

        from_pretrained(offline, "org/other")
