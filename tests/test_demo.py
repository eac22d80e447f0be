"""dt demo and dt generate run end to end on the tiny default and write what they promise."""

from __future__ import annotations

import argparse
import json

from PIL import Image

from diffusion_templates import demo


def test_demo_writes_contact_sheet_and_report(tmp_path):
    args = argparse.Namespace(command="demo", out=str(tmp_path / "demo"), steps=2, base=None)
    assert demo.main(args) == 0
    sheet = Image.open(tmp_path / "demo" / "contact_sheet.png")
    report = (tmp_path / "demo" / "report.md").read_text()
    # One tile per row of the report's table (base, references, each template run), 4 per sheet row.
    tiles = sum(1 for line in report.splitlines() if line.startswith("| ") and not line.startswith("| run "))
    assert tiles >= 3
    assert sheet.size == (4 * 192, -(-tiles // 4) * (192 + 18))
    # The suite installs the embedded dt-base-shapes model: the demo must use it, not the stand-in.
    assert "dt-base-shapes" in report and "RANDOM weights" not in report
    # The test-only templates on sys.path are installed plugins too: each gets a row with its numbers.
    assert "| base |" in report and "| test-kv |" in report and "| test-lora |" in report
    assert "Skipped test-flaky" in report  # a failing plugin is reported, not fatal


def test_a_template_with_a_demo_prompt_is_measured_against_that_prompt_alone(tmp_path):
    from diffusion_templates.plugins import default_host

    kv = default_host().get("template", "test-kv")  # an installed template, given a demo prompt here
    try:
        kv.demo_prompt = lambda prompt: prompt + " at night"
        args = argparse.Namespace(command="demo", out=str(tmp_path / "demo"), steps=2, base=None)
        assert demo.main(args) == 0
    finally:
        del kv.demo_prompt
    report = (tmp_path / "demo" / "report.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in report.splitlines() if line.startswith("| ")}
    night = [label for label in rows if label.startswith("no template:") and label.endswith("at night")]
    assert len(night) == 1  # the reference: the same prompt without templates, rendered once
    assert "at night`" in rows["test-kv"] and "| - |" in rows["test-lora"]


def test_generate_parses_template_arguments_and_job_file(tmp_path):
    job = tmp_path / "job.json"
    spec = {"prompt": "a blue square", "templates": [{"template": "test-lora", "rank": 2}]}
    job.write_text(json.dumps(spec))
    args = argparse.Namespace(
        command="generate",
        prompt="",
        template=[["test-kv", "scale=0.5", "length=2"]],
        negative_template=[],
        base=None,
        steps=2,
        seed=0,
        size=None,
        guidance=None,
        job=str(job),
        out=str(tmp_path / "out.png"),
    )
    assert demo.main(args) == 0
    assert Image.open(tmp_path / "out.png").size == (64, 64)
    assert demo.parse_template_args([["t", "a=1", "b=x.png", "c=[1, 2]"]]) == [
        {"template": "t", "a": 1, "b": "x.png", "c": [1, 2]}
    ]


def test_small_models_run_on_one_torch_thread_and_the_count_is_put_back(monkeypatch):
    import torch

    from diffusion_templates.testing.tiny import TINY_PIPELINES

    pipe = TINY_PIPELINES["flux2_klein"].build()
    monkeypatch.delenv("DT_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert demo._threads_for(pipe) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert demo._threads_for(pipe) is None  # the user's setting stands
    monkeypatch.setenv("DT_THREADS", "3")
    assert demo._threads_for(pipe) == 3
    monkeypatch.delenv("DT_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with demo._threads(pipe):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
