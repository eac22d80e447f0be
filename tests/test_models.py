"""Template models: loaded on first use, kept in an LRU by parameter bytes, offloaded between uses."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from diffusers.configuration_utils import register_to_config
from pydantic import Field

from diffusion_templates import KVCache, Template, TemplateInputs, TemplatePipeline, models
from diffusion_templates.models import TemplateModelLoader, module_nbytes
from diffusion_templates.plugins import PluginHost
from diffusion_templates.template import TemplateModel


class TinyModel(TemplateModel):
    @register_to_config
    def __init__(self, width: int = 8, seed: int = 0):
        super().__init__()
        self.proj = torch.nn.Linear(width, width, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.full((width, width), float(seed)))

    def forward(self, x):
        return self.proj(x)


@pytest.fixture()
def folders(tmp_path):
    """Three saved models of 1 KiB of parameters each (width 16, fp32), weights 0, 1, 2."""
    out = []
    for seed in range(3):
        folder = tmp_path / f"m{seed}"
        TinyModel(width=16, seed=seed).save_pretrained(folder)
        out.append(folder)
    return out


def test_loads_on_first_use_only(folders):
    loader = TemplateModelLoader()
    assert len(loader) == 0
    model = loader.load(TinyModel, folders[1])
    assert isinstance(model, TinyModel) and not model.training
    assert float(model.proj.weight[0, 0]) == 1.0 and not model.proj.weight.requires_grad
    assert loader.load(TinyModel, folders[1]) is model
    assert loader.load(TinyModel, str(folders[1]) + "/") is model  # same folder, spelled differently
    assert loader.stats.loads == 1 and loader.stats.hits == 2
    half = loader.load(TinyModel, folders[1], dtype=torch.bfloat16)
    assert half is not model and half.proj.weight.dtype == torch.bfloat16
    assert loader.stats.loads == 2 and loader.nbytes == 1024 + 512


def test_lru_eviction_by_parameter_bytes(folders):
    size = module_nbytes(TinyModel(width=16))
    assert size == 1024
    loader = TemplateModelLoader(max_bytes=2 * size)
    a = loader.load(TinyModel, folders[0])
    loader.load(TinyModel, folders[1])
    assert loader.load(TinyModel, folders[0]) is a  # a is now the most recently used
    loader.load(TinyModel, folders[2])  # over budget: the least recently used (m1) goes
    assert [float(m.proj.weight[0, 0]) for m in loader.models()] == [0.0, 2.0]
    assert loader.stats.evictions == 1 and loader.nbytes == 2 * size
    loader.load(TinyModel, folders[1])  # evicted: read again
    assert loader.stats.loads == 4


def test_a_model_over_budget_is_still_served_alone(folders):
    loader = TemplateModelLoader(max_bytes=100)
    first = loader.load(TinyModel, folders[0])
    assert loader.load(TinyModel, folders[0]) is first
    loader.load(TinyModel, folders[1])
    assert len(loader) == 1 and loader.stats.evictions == 1


def test_evict_and_clear(folders):
    loader = TemplateModelLoader()
    for folder in folders:
        loader.load(TinyModel, folder)
    assert loader.evict(TinyModel, folders[0]) == 1 and len(loader) == 2
    assert loader.evict(TinyModel) == 2 and len(loader) == 0


def test_code_in_a_weights_folder_is_still_refused(folders):
    (folders[0] / "model.py").write_text("raise SystemExit")
    with pytest.raises(Exception, match="refusing to load"):
        TemplateModelLoader().load(TinyModel, folders[0])


def test_concurrent_first_uses_load_once(folders):
    loader = TemplateModelLoader()
    reads = []

    def slow_loader(folder, **kwargs):
        reads.append(folder)
        time.sleep(0.05)
        return TinyModel.from_pretrained(folder, **kwargs)

    barrier = threading.Barrier(6)
    got = []

    def worker():
        barrier.wait()
        got.append(loader.load(TinyModel, folders[2], loader=slow_loader))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(reads) == 1 and len(got) == 6 and all(m is got[0] for m in got)


class _FakeDevices:
    """Stands in for an accelerator on a CPU-only machine: records each model's (fake) device."""

    def __init__(self, monkeypatch):
        self.where: dict[int, torch.device] = {}
        self.moves: list[tuple[float, str]] = []
        monkeypatch.setattr(models, "_device_of", lambda m: self.where.get(id(m), torch.device("cpu")))

        def fake_to(module, *args, **kwargs):
            device = kwargs.get("device", args[0] if args else None)
            if device is not None and not isinstance(device, torch.dtype):
                self.where[id(module)] = torch.device(device)
                self.moves.append((float(module.proj.weight[0, 0]), str(device)))
            return module

        monkeypatch.setattr(TinyModel, "to", fake_to)


def test_offload_keeps_only_the_model_in_use_on_the_device(folders, monkeypatch):
    fake = _FakeDevices(monkeypatch)
    loader = TemplateModelLoader(offload=True)
    a = loader.load(TinyModel, folders[0], device="cuda:0")
    assert fake.where[id(a)] == torch.device("cuda:0")
    b = loader.load(TinyModel, folders[1], device="cuda:0")
    assert fake.where[id(a)].type == "cpu" and fake.where[id(b)] == torch.device("cuda:0")
    assert loader.load(TinyModel, folders[0], device="cuda:0") is a  # back on the device, not reloaded
    assert fake.where[id(a)] == torch.device("cuda:0") and fake.where[id(b)].type == "cpu"
    assert loader.stats.loads == 2 and loader.stats.offloads == 2 and loader.stats.onloads == 1
    with loader.use(TinyModel, folders[1], device="cuda:0") as model:
        assert fake.where[id(model)] == torch.device("cuda:0")
    assert fake.where[id(b)].type == "cpu"
    loader.offload_all()
    assert all(fake.where[id(m)].type == "cpu" for m in loader.models())


def test_without_offload_models_stay_on_their_device(folders, monkeypatch):
    fake = _FakeDevices(monkeypatch)
    loader = TemplateModelLoader()
    a = loader.load(TinyModel, folders[0], device="cuda:0")
    loader.load(TinyModel, folders[1], device="cuda:0")
    assert fake.where[id(a)] == torch.device("cuda:0") and loader.stats.offloads == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offload_on_a_real_gpu(folders):
    loader = TemplateModelLoader(offload=True)
    a = loader.load(TinyModel, folders[0], device="cuda")
    b = loader.load(TinyModel, folders[1], device="cuda")
    assert a.proj.weight.device.type == "cpu" and b.proj.weight.device.type == "cuda"
    assert loader.load(TinyModel, folders[0], device="cuda").proj.weight.device.type == "cuda"


# ------------------------------------------------------------------------ a template that uses it
class ShineInputs(TemplateInputs):
    scale: float = Field(1.0, ge=0.0, le=4.0)


def _shine_template(folder, loader):
    class Shine(Template):
        Inputs = ShineInputs
        carriers = ("kv",)

        def encode(self, inputs, context):
            model = loader.load(TinyModel, folder, device=context.device, dtype=context.dtype)
            keys, values = {}, {}
            for name, layer in context.adapter.attention_layers().items():
                x = torch.full((1, 16), inputs.scale, dtype=context.dtype, device=context.device)
                token = model(x).reshape(-1)[: layer.heads * layer.head_dim]
                token = token.repeat(layer.heads * layer.head_dim // token.numel() + 1)
                token = token[: layer.heads * layer.head_dim].reshape(1, 1, layer.heads, layer.head_dim)
                keys[name], values[name] = token, -token
            return KVCache(keys=keys, values=values)

    return Shine


def test_templates_load_their_models_lazily(folders, flux2_pipe):
    loader = TemplateModelLoader()
    host = PluginHost()
    for i in range(3):
        host.register("template", f"shine-{i}", _shine_template(folders[i], loader))
    tp = TemplatePipeline(flux2_pipe, plugins=host, store=None)
    assert len(loader) == 0  # registering loads nothing
    tp.encode({"template": "shine-1", "scale": 0.5})
    tp.encode({"template": "shine-1", "scale": 0.7})  # a new input: the model runs, it is not reloaded
    assert len(loader) == 1 and loader.stats.loads == 1 and loader.stats.hits == 1
    tp.encode("shine-0")
    assert loader.stats.loads == 2


def test_module_level_load_uses_the_process_wide_loader(folders, monkeypatch):
    monkeypatch.setattr(models, "_default", None)
    first = models.load(TinyModel, folders[0])
    assert models.load(TinyModel, folders[0]) is first and models.default_loader().stats.loads == 1
    configured = models.configure(max_bytes=2048, offload=True)
    assert models.default_loader() is configured and len(configured) == 0
    monkeypatch.setattr(models, "_default", None)
