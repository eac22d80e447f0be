"""What a new user trips over in ``dt generate`` / ``dt list`` / ``dt info`` (issue 20), through ``cli.main``.

Generations use the embedded dt-base-shapes model with one or two steps.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion_templates import cli, demo


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- the job file's seed and out --
def test_job_seed_and_out_are_honoured_and_given_flags_win(in_tmp: Path) -> None:
    assert cli.main(["generate", "--steps", "2", "--out", "seed0.png"]) == 0
    for seed in (3, 7):
        (in_tmp / "job.json").write_text(json.dumps({"seed": seed, "out": f"job{seed}.png", "steps": 2}))
        assert cli.main(["generate", "--job", "job.json"]) == 0
        assert not (in_tmp / "out.png").exists()  # the default out did not override the job's
        assert cli.main(["generate", "--steps", "2", "--seed", str(seed), "--out", f"flag{seed}.png"]) == 0
        # The job's seed is the seed used: the same image as --seed, another than seed 0.
        assert np.array_equal(_pixels(in_tmp / f"job{seed}.png"), _pixels(in_tmp / f"flag{seed}.png"))
        assert not np.array_equal(_pixels(in_tmp / f"job{seed}.png"), _pixels(in_tmp / "seed0.png"))
    # Flags given explicitly win over the job's fields, 0 included.
    argv = ["generate", "--job", "job.json", "--seed", "0", "--out", "given.png"]
    assert cli.main(argv) == 0
    assert np.array_equal(_pixels(in_tmp / "given.png"), _pixels(in_tmp / "seed0.png"))


def test_a_yaml_job_is_read_too(in_tmp: Path) -> None:
    (in_tmp / "job.yaml").write_text("seed: 5\nout: y/five.png\nsteps: 1\n")
    assert cli.main(["generate", "--job", "job.yaml"]) == 0
    assert cli.main(["generate", "--steps", "1", "--seed", "5", "--out", "five.png"]) == 0
    assert np.array_equal(_pixels(in_tmp / "y" / "five.png"), _pixels(in_tmp / "five.png"))


# -- argument errors: dt: error: ..., exit code 2, no traceback --
def _files(tmp: Path) -> None:
    (tmp / "bad.json").write_text('{"seed": 1,')
    (tmp / "bad.yaml").write_text("seed: [1\n")
    (tmp / "list.json").write_text("[1, 2]")
    (tmp / "zero.json").write_text('{"steps": 0}')
    (tmp / "seed.json").write_text('{"seed": "seven"}')
    (tmp / "templates.json").write_text('{"templates": 5}')
    (tmp / "empty").mkdir()


ARGUMENT_ERRORS = {
    "missing job": (["--job", "nope.json"], "nope.json"),
    "invalid JSON": (["--job", "bad.json"], "not valid JSON"),
    "invalid YAML": (["--job", "bad.yaml"], "not valid YAML"),
    "job not a mapping": (["--job", "list.json"], "expected a mapping"),
    "job steps 0": (["--job", "zero.json"], "'steps'"),
    "job seed not a number": (["--job", "seed.json"], "'seed'"),
    "job templates not a list": (["--job", "templates.json"], "'templates'"),
    "base path missing": (["--base", "./no/such/model"], "no such folder"),
    "base folder not a pipeline": (["--base", "empty"], "model_index.json"),
    "steps 0": (["--steps", "0"], "--steps"),
    "steps not a number": (["--steps", "many"], "--steps"),
    "size 0": (["--size", "0"], "--size"),
    "template pair without =": (["--template", "color-kv", "red"], "KEY=VALUE"),
    "unknown flag": (["--colour", "red"], "unrecognized"),
}


@pytest.mark.parametrize("case", sorted(ARGUMENT_ERRORS))
def test_argument_errors_exit_2_with_a_message(
    case: str, in_tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _files(in_tmp)

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("an argument error must be reported before the base model loads")

    monkeypatch.setattr(demo, "load_base", no_loading)
    extra, expected = ARGUMENT_ERRORS[case]
    assert cli.main(["generate", *extra]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and expected in err and "Traceback" not in err
    assert not (in_tmp / "out.png").exists()


def test_steps_0_is_refused_by_dt_demo_too(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err


@pytest.mark.parametrize("size", [50, 60, 9])
def test_a_size_off_the_models_multiple_is_refused_before_denoising(
    size: int, in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["generate", "--steps", "1", "--size", str(size)]) == 2
    err = capsys.readouterr().err
    assert f"--size {size}" in err and "multiple of 8" in err  # dt-base-shapes: VAE factor 4 x patch 2
    assert not (in_tmp / "out.png").exists()


def test_a_size_on_the_multiple_is_used(in_tmp: Path) -> None:
    assert cli.main(["generate", "--steps", "1", "--size", "32"]) == 0
    assert Image.open(in_tmp / "out.png").size == (32, 32)


# -- template inputs are checked before the base model loads --
@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (["color-kv", "colr=red"], "'colr'"),
        (["color-kv", "color=notacolour"], "notacolour"),
        (["brightness-kv", "scale=[1]"], "brightness-kv"),
        (["no-such-template"], "no-such-template"),
    ],
)
def test_template_input_errors_come_before_the_base_model_loads(
    template: list[str],
    expected: str,
    in_tmp: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("template inputs must be checked before the base model loads")

    monkeypatch.setattr(demo, "load_base", no_loading)
    assert cli.main(["generate", "--template", *template]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dt: error: ") and expected in err


def test_a_job_files_templates_are_checked_before_loading_too(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "load_base", lambda *a, **k: pytest.fail("loaded the base model"))
    (in_tmp / "job.json").write_text(json.dumps({"negative_templates": [{"template": "color-kv", "x": 1}]}))
    assert cli.main(["generate", "--job", "job.json"]) == 2
    assert "color-kv" in capsys.readouterr().err


# -- quiet loading --
def test_loading_prints_no_progress_bar_and_no_accelerate_warning(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffusers.models.modeling_utils as modeling_utils
    import diffusers.pipelines.pipeline_utils as pipeline_utils
    import diffusers.utils as diffusers_utils
    from diffusers.utils import logging as diffusers_logging

    # As in a wheel install without accelerate, where diffusers warned on every component.
    for module in (modeling_utils, pipeline_utils, diffusers_utils):
        monkeypatch.setattr(module, "is_accelerate_available", lambda: False)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("diffusers").addHandler(handler)
    try:
        assert cli.main(["generate", "--steps", "1"]) == 0
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    err = capsys.readouterr().err
    assert "Loading pipeline components" not in err
    assert not [r for r in records if "accelerate" in r.getMessage()]
    assert diffusers_logging.is_progress_bar_enabled()  # put back after loading


# -- dt list and dt info --
def test_list_shows_the_base_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["base", "shapes", "0.1.0", "dt-base-shapes"] in [row[:4] for row in rows]
    assert cli.main(["list", "--kind", "base", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(b["kind"], b["name"], b["distribution"]) for b in listed] == [
        ("base", "shapes", "dt-base-shapes")
    ]
    assert cli.main(["list", "--kind", "template", "--json"]) == 0
    assert all(i["kind"] == "template" for i in json.loads(capsys.readouterr().out))
    assert cli.main(["list", "--json"]) == 0  # plain --json: the plugins, as before
    assert "base" not in {i["kind"] for i in json.loads(capsys.readouterr().out)}


def test_info_shows_that_color_kv_takes_a_colour_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", "color-kv"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("color:"))
    assert "str" in line.split("(")[0]
    assert cli.main(["info", "color-kv", "--json"]) == 0
    schema = json.loads(capsys.readouterr().out)["inputs_schema"]["properties"]["color"]
    assert {"type": "string"} in schema["anyOf"]
    # The validated value is still the (r, g, b) triple the template reads.
    from diffusion_templates.plugins import default_host

    inputs = default_host().get("template", "color-kv").Inputs
    assert inputs(color="red").color == (1.0, 0.0, 0.0)
    assert inputs(color=[0, 0.5, 1]).color == (0.0, 0.5, 1.0)


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--template", "colr-kv", "color=red"],
        ["generate", "--template", "color-kv", "red"],
        ["generate", "--job", "missing.json"],
        ["generate", "--base", "./no/such/model"],
    ],
)
def test_a_misspelt_name_or_argument_is_reported_without_importing_torch(
    argv: list[str], in_tmp: Path
) -> None:
    import subprocess
    import sys

    code = (
        "import sys\nfrom diffusion_templates import cli\n"
        f"rc = cli.main({argv!r})\n"
        "print(rc, sorted(m for m in ('torch', 'diffusers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[-2] == "2 []", done.stdout + done.stderr
    assert done.stderr.startswith("dt: error: ")
