"""Row 6 of bench/run.py, in its own process: peak memory with 10 templates registered.

``python bench/memory_child.py MODE MODELS_DIR`` prints one JSON line. MODE:

* ``eager``      each template loads its model when it is registered (no lazy loading), one is used;
* ``lazy``       models load on first use (``TemplateModelLoader``), one template is used;
* ``lazy-all``   all 10 used in turn, unbounded loader (ends like eager);
* ``lazy-2``     all 10 used in turn, loader budget of 2 models.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def _status(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def main() -> None:
    mode, root = sys.argv[1], Path(sys.argv[2])
    import torch

    torch.set_num_threads(1)
    from common import Brightness, make_host

    from diffusion_templates import TemplatePipeline
    from diffusion_templates.models import TemplateModelLoader, module_nbytes
    from diffusion_templates.testing.tiny import build_flux2_klein, tiny_call_kwargs

    pipe = build_flux2_klein()
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt="warm up", **tiny_call_kwargs("flux2_klein"))
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    base = _status("VmRSS")
    reset = _reset_peak()
    start = time.perf_counter()
    per_model = sum(f.stat().st_size for f in folders[0].glob("*.safetensors"))  # ~ its parameter bytes
    loader = TemplateModelLoader(max_bytes=int(2.5 * per_model) if mode == "lazy-2" else None)
    templates = {}
    for i, folder in enumerate(folders):
        templates[f"b{i}"] = Brightness(folder, loader, eager=mode == "eager")
    if mode == "eager":
        per_model = module_nbytes(templates["b0"].model)
    elif len(loader):
        raise AssertionError("registering a lazy template loaded its model")
    register_s = time.perf_counter() - start
    host = make_host(templates)
    tp = TemplatePipeline(pipe, plugins=host, store=None)
    used = [0] if mode in ("eager", "lazy") else range(len(folders))
    start = time.perf_counter()
    for i in used:
        tp(prompt="a cat", templates=[{"template": f"b{i}", "scale": 0.3}], **tiny_call_kwargs("flux2_klein"))
    calls_s = time.perf_counter() - start
    peak = _status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "mode": mode,
                "base": base,
                "peak": peak,
                "delta": peak - base,
                "peak_exact": reset,
                "register_s": register_s,
                "calls_s": calls_s,
                "models_kept": len(loader) if mode != "eager" else len(folders),
                "loads": loader.stats.loads,
                "per_model": per_model,
            }
        )
    )


if __name__ == "__main__":
    main()
