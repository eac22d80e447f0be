"""Attacks on the cache store: a shared disk folder it must not trust, and keys that must not collide.

The disk folder of a ``TemplateCacheStore`` may be shared by processes and users. Whatever is put
there, the store only serves entries it wrote and that verify (digest of every file), only deletes
its own complete entries, never follows a symlink or opens a FIFO, and never raises: anything else is
a miss counted in ``stats.disk_errors``. Keys are equal across processes (``PYTHONHASHSEED``) and
differ for different weights (a fine-tune, an in-place edit) and different file contents (a LoRA
rewritten with its old size and modification time).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusion_templates import KVCache, LoraCache, Template, TemplateInputs, TemplatePipeline
from diffusion_templates.plugins import PluginHost
from diffusion_templates.store import TemplateCacheStore, file_digest, forget_weight_digests
from diffusion_templates.store.files import NotRegularFile
from diffusion_templates.testing.tiny import TINY_PIPELINES

#: The test's own guard against a hang (not a timing assertion: any healthy call takes far less).
JOIN_TIMEOUT = 60.0


def key(i: int) -> str:
    return hashlib.sha256(f"entry {i}".encode()).hexdigest()


def lora(seed: int, n: int = 16) -> list[LoraCache]:
    g = torch.Generator().manual_seed(seed)
    return [LoraCache(down={"m": torch.randn(2, n, generator=g)}, up={"m": torch.randn(n, 2, generator=g)})]


def kv(seed: int) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    return KVCache(
        keys={"double_0": torch.randn(1, 2, 2, 8, generator=g)},
        values={"double_0": torch.randn(1, 2, 2, 8, generator=g)},
    )


def equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        all(
            torch.equal(x, y)
            for x, y in zip(p.flat_tensors().values(), q.flat_tensors().values(), strict=True)
        )
        for p, q in zip(a, b, strict=True)
    )


def fresh(folder: Path, **kwargs) -> TemplateCacheStore:
    """Another process opening the same folder (nothing in memory)."""
    return TemplateCacheStore(max_bytes=0, disk_dir=folder, **kwargs)


def in_thread(fn, *args):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it does not return."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(JOIN_TIMEOUT)
    assert not thread.is_alive(), f"{fn} blocked"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def victims(tmp_path: Path) -> dict[Path, bytes]:
    """Files outside the store's folder (and foreign files in it) that nothing may delete."""
    outside = tmp_path / "victim.txt"
    outside.write_bytes(b"precious")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "weights.safetensors").write_bytes(b"not the store's")
    return {outside: b"precious", tmp_path / "other" / "weights.safetensors": b"not the store's"}


def assert_intact(files: dict[Path, bytes]) -> None:
    for path, content in files.items():
        assert path.read_bytes() == content, path


# ------------------------------------------------------------------------------- index file attacks
def _hostile_indexes(tmp_path: Path, folder: Path, other: str) -> list:
    """Index contents naming files the entry does not own, or in no valid form."""
    victim = str(tmp_path / "victim.txt")
    other_file = str(folder / f"{other}-0.safetensors")
    good = json.loads((folder / f"{other}.json").read_text())
    return [
        {"format": 1, "files": ["../victim.txt"], "carriers": ["lora"]},  # store format 1's layout
        {"format": 1, "files": [victim], "carriers": ["lora"]},
        {"format": 1, "files": [other_file], "carriers": ["lora"]},  # another entry's file: applied as ours
        {"format": 1, "files": [], "carriers": []},  # a "valid" hit dropping the template
        {**good, "files": []},
        {**good, "key": other},  # another key's index copied over ours
        good,  # the other entry's index verbatim (names the other key)
        [5],
        {"format": 2, "files": ["a\x00b"]},
        {"files": [{"bytes": "x", "sha256": 5, "carrier": None}]},
        {**good, "files": [{"bytes": -1, "sha256": "0" * 64, "carrier": "lora"}]},
        {**good, "files": [{**good["files"][0], "name": "../victim.txt"}]},
        {**good, "files": good["files"] * 1000},
        None,
        "files",
        3.5,
    ]


def test_hostile_indexes_are_misses_and_delete_nothing(tmp_path):
    files = victims(tmp_path)
    folder = tmp_path / "store"
    writer = fresh(folder)
    target, other = key(1), key(2)
    writer.put(other, lora(2))
    bodies = [json.dumps(i).encode() for i in _hostile_indexes(tmp_path, folder, other)]
    bodies += [
        b"",
        b"\xff\xfe not utf-8",
        b"[" * 100_000,
        b'{"format": NaN}',
        b" " * (1 << 20),
        b"{" + b"}" * 9,
    ]
    before = sorted(p.name for p in folder.iterdir())
    for body in bodies:
        writer.put(target, lora(1))
        (folder / f"{target}.json").write_bytes(body)
        reader = fresh(folder)
        assert reader.get(target) is None, body[:80]
        assert reader.stats.disk_errors == 1 and reader.stats.disk_hits == 0
        assert target not in reader
        got = reader.get_or_compute(target, lambda: lora(1))  # computed again, and the entry replaced
        assert equal(got, lora(1)) and reader.stats.misses == 1
        assert equal(fresh(folder).get(target), lora(1))
        assert_intact(files)
        assert equal(fresh(folder).get(other), lora(2))  # the other entry was neither served nor hurt
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        before + [f"{target}.json", f"{target}-0.safetensors"]
    )


def test_victims_survive_a_trim_and_a_clear(tmp_path):
    files = victims(tmp_path)
    folder = tmp_path / "store"
    store = fresh(folder, disk_max_bytes=10**9)
    for i in range(3):
        store.put(key(i), lora(i))
    hostile = {
        key(0): {"format": 1, "files": ["../victim.txt", "../other/weights.safetensors"], "carriers": []},
        key(1): {
            "format": 2,
            "store": "diffusion-templates store",
            "key": key(1),
            "files": [{"bytes": 8, "sha256": "0" * 64, "carrier": "lora"}],
        },
    }
    for k, body in hostile.items():
        (folder / f"{k}.json").write_text(json.dumps(body))
    os.symlink(tmp_path / "victim.txt", folder / f"{key(7)}-0.safetensors")
    os.symlink(tmp_path / "victim.txt", folder / f"{key(8)}.json")
    fresh(folder, disk_max_bytes=1).put(key(5), lora(5))  # a write that trims the folder to nothing
    assert_intact(files)
    assert not (folder / f"{key(5)}.json").exists() and not (folder / f"{key(2)}.json").exists()
    assert (folder / f"{key(0)}.json").exists()  # not a complete entry of the store: left alone
    store.clear(disk=True)
    assert_intact(files)
    assert (folder / f"{key(7)}-0.safetensors").is_symlink() and (folder / f"{key(8)}.json").is_symlink()


def test_clear_removes_only_the_stores_complete_entries(tmp_path):
    folder = tmp_path / "store"
    store = fresh(folder)
    mine = [key(i) for i in range(4)]
    for i, k in enumerate(mine):
        store.put(k, lora(i) + [kv(i)])
    foreign = {
        "notes.json": b'{"a": 1}',
        "model.safetensors": b"weights of someone else",
        f"{key(9)}.json": b'{"format": 2, "files": []}',  # named like an index, not one
        f"{key(10)}-0.safetensors": b"named like a cache file, no index",
        "config.json": json.dumps({"files": [f"{mine[0]}-0.safetensors"]}).encode(),
    }
    for name, body in foreign.items():
        (folder / name).write_bytes(body)
    (folder / "sub").mkdir()
    (folder / "sub" / f"{key(11)}.json").write_bytes(b"{}")
    store.clear(disk=True)
    for name, body in foreign.items():
        assert (folder / name).read_bytes() == body, name
    assert (folder / "sub" / f"{key(11)}.json").exists()
    left = {p.name for p in folder.iterdir()}
    assert left == set(foreign) | {"sub"}, left - set(foreign)


def test_flipped_tensor_bytes_with_the_header_kept_are_a_miss(tmp_path):
    folder = tmp_path / "store"
    store = fresh(folder)
    for seed in range(6):
        k = key(100 + seed)
        store.put(k, lora(seed, n=64))
        path = folder / f"{k}-0.safetensors"
        data = bytearray(path.read_bytes())
        header = 8 + int.from_bytes(data[:8], "little")
        g = torch.Generator().manual_seed(seed)
        position = header + int(torch.randint(0, len(data) - header, (1,), generator=g))
        data[position] ^= 1 << int(torch.randint(0, 8, (1,), generator=g))  # a still-finite float, say
        path.write_bytes(bytes(data))
        reader = fresh(folder)
        assert reader.get(k) is None and reader.stats.disk_errors == 1
        truncated = fresh(folder)
        path.write_bytes(bytes(data[:-4]))
        assert truncated.get(k) is None and truncated.stats.disk_errors == 1


def test_an_interrupted_write_leaves_nothing_that_is_served(tmp_path, monkeypatch):
    from diffusion_templates.store import disk

    folder = tmp_path / "store"
    store = fresh(folder)
    real = os.replace

    for crash_at in range(3):  # after 0, 1 or 2 of the two data files and before the index
        k = key(200 + crash_at)
        calls = []

        def replace(src, dst, calls=calls, crash_at=crash_at):
            if len(calls) == crash_at or str(dst).endswith(".json"):
                raise KeyboardInterrupt("power cut")
            calls.append(dst)
            return real(src, dst)

        monkeypatch.setattr(disk.os, "replace", replace)
        with pytest.raises(KeyboardInterrupt):
            store._disk.put(k, lora(crash_at) + [kv(crash_at)])
        monkeypatch.setattr(disk.os, "replace", real)
        assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # temporary files removed
        reader = fresh(folder)
        assert reader.get(k) is None and reader.stats.disk_errors == 0  # no index: a plain miss
        assert equal(
            reader.get_or_compute(k, lambda c=crash_at: lora(c) + [kv(c)]), lora(crash_at) + [kv(crash_at)]
        )
        assert fresh(folder).get(k) is not None


def test_symlinked_entries_are_not_followed(tmp_path):
    folder = tmp_path / "store"
    elsewhere = tmp_path / "elsewhere"
    fresh(elsewhere).put(key(1), lora(1))
    fresh(folder).put(key(2), lora(2))
    os.symlink(elsewhere / f"{key(1)}.json", folder / f"{key(1)}.json")
    os.symlink(elsewhere / f"{key(1)}-0.safetensors", folder / f"{key(1)}-0.safetensors")
    reader = fresh(folder)
    assert reader.get(key(1)) is None and reader.stats.disk_errors == 1
    # a genuine index beside a symlinked cache file: not served either
    (folder / f"{key(1)}.json").unlink()
    (folder / f"{key(1)}.json").write_bytes((elsewhere / f"{key(1)}.json").read_bytes())
    assert fresh(folder).get(key(1)) is None
    reader.clear(disk=True)
    assert (elsewhere / f"{key(1)}-0.safetensors").exists() and fresh(elsewhere).get(key(1)) is not None


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifos_in_the_folder_never_block(tmp_path):
    folder = tmp_path / "store"
    store = fresh(folder, disk_max_bytes=10**9)
    store.put(key(0), lora(0))
    os.mkfifo(folder / f"{key(1)}.json")  # an index that is a FIFO
    store.put(key(2), lora(2))
    os.unlink(folder / f"{key(2)}-0.safetensors")
    os.mkfifo(folder / f"{key(2)}-0.safetensors")  # a cache file that is a FIFO
    os.mkfifo(folder / "someone-elses.json")
    reader = fresh(folder, disk_max_bytes=10**9)
    assert in_thread(reader.get, key(1)) is None
    assert in_thread(reader.get, key(2)) is None
    assert in_thread(lambda: key(1) in reader) is False
    assert equal(in_thread(reader.get_or_compute, key(1), lambda: lora(1)), lora(1))  # writes, trims
    in_thread(lambda: reader.clear(disk=True))
    assert (folder / "someone-elses.json").exists() and not (folder / f"{key(1)}.json").exists()
    with pytest.raises(NotRegularFile):
        in_thread(file_digest, folder / "someone-elses.json")


# -------------------------------------------------------------------------------------------- keys
class Inputs(TemplateInputs):
    scale: float = 1.0


class Reads(Template):
    """A template whose caches depend on the pipeline's weights (``reads`` set per test)."""

    Inputs = Inputs
    carriers = ("kv",)

    def __init__(self, reads=None):
        self.runs = 0
        if reads is not None:
            self.reads = reads

    def encode(self, inputs, context):
        self.runs += 1
        layers = context.adapter.attention_layers()
        first = next(iter(layers.values()))
        shape = (1, 2, first.heads, first.head_dim)
        value = torch.full(shape, inputs.scale)
        return KVCache(keys={n: value for n in layers}, values={n: value.clone() for n in layers})


def host_with(template: Reads) -> PluginHost:
    host = PluginHost()
    host.register("template", "reads", template)
    host.info("template", "reads").version = "1.0"
    return host


_KEY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from diffusion_templates import TemplatePipeline
    from diffusion_templates.testing.tiny import TINY_PIPELINES
    from diffusion_templates.plugins import PluginHost
    sys.path.insert(0, sys.argv[1])
    from test_store_attacks import Inputs, Reads, host_with
    out = {}
    for family in ("flux2_klein", "sd3"):
        tp = TemplatePipeline(TINY_PIPELINES[family].build(), plugins=host_with(Reads()))
        out[family] = [tp.store.key_for(tp, "reads", Inputs(scale=s)) for s in (0.5, 1.0)]
        out[family + ":defaults"] = list(tp.adapter.denoiser.config.get("_use_default_values", []))
    print(json.dumps(out))
    """
)


def test_keys_are_equal_across_hash_seeds():
    env_base = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    here = str(Path(__file__).parent)
    runs = [  # in parallel: each spends its time importing torch and diffusers
        subprocess.Popen(
            [sys.executable, "-c", _KEY_SCRIPT, here],
            env={**env_base, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in ("0", "1")
    ]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    # the config the keys hash does carry a list in set order, which differs between the two seeds
    # (so the old recipe, which hashed it, gave different keys)
    for family in ("flux2_klein", "sd3"):
        orders = [r[f"{family}:defaults"] for r in results]
        assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]
    for family in ("flux2_klein", "sd3"):
        keys = [r[family] for r in results]
        assert keys[0] == keys[1] and len(set(keys[0])) == 2 and all(keys[0])


@pytest.fixture(scope="module")
def twins():
    """Two tiny pipelines built from the same seed: the same weights in different objects."""
    spec = TINY_PIPELINES["flux2_klein"]
    return spec.build(seed=3), spec.build(seed=3)


def _nudge(module: torch.nn.Module, index: int, amount: float = 1e-3) -> None:
    with torch.no_grad():
        list(module.parameters())[index].view(-1)[0].add_(amount)


@pytest.mark.parametrize(
    "component,index", [("transformer", 0), ("transformer", 5), ("vae", 3), ("text_encoder", 2)]
)
def test_a_fine_tune_with_one_weight_changed_misses(twins, component, index):
    base, tuned = twins
    template = Reads()
    store = TemplateCacheStore()
    a = TemplatePipeline(base, plugins=host_with(template), store=store)
    b = TemplatePipeline(tuned, plugins=host_with(template), store=store)
    a.encode({"template": "reads", "scale": 0.25})
    b.encode({"template": "reads", "scale": 0.25})
    assert template.runs == 1  # same weights in another object: the same entry
    _nudge(getattr(tuned, component), index)
    try:
        b.encode({"template": "reads", "scale": 0.25})
        assert template.runs == 2
        a.encode({"template": "reads", "scale": 0.25})
        assert template.runs == 2  # the base model's entry is untouched
    finally:
        _nudge(getattr(tuned, component), index, -1e-3)
    b.encode({"template": "reads", "scale": 0.25})
    # x + 1e-3 - 1e-3 is not always x in float32: equal bytes hit, changed bytes miss
    restored = torch.equal(
        list(getattr(tuned, component).parameters())[index],
        list(getattr(base, component).parameters())[index],
    )
    assert template.runs == (2 if restored else 3)


def test_reads_narrows_the_weights_a_key_depends_on(twins):
    base, tuned = twins
    template = Reads(reads=("vae",))
    store = TemplateCacheStore()
    a = TemplatePipeline(base, plugins=host_with(template), store=store)
    b = TemplatePipeline(tuned, plugins=host_with(template), store=store)
    a.encode("reads")
    saved = tuned.transformer.state_dict()
    saved = {k: v.clone() for k, v in saved.items()}
    try:
        _nudge(tuned.transformer, 1)
        b.encode("reads")
        assert template.runs == 1  # the transformer is not read by this template
        _nudge(tuned.vae, 1)
        b.encode("reads")
        assert template.runs == 2
    finally:
        tuned.transformer.load_state_dict(saved)
        _nudge(tuned.vae, 1, -1e-3)
    for bad in ("vae", 5, ("vae", 5)):
        with pytest.raises(TypeError, match="template 'reads'.*reads"):
            TemplatePipeline(base, plugins=host_with(Reads(reads=bad))).encode("reads")


def test_in_place_weight_edits_miss(flux2_pipe):
    template = Reads(reads=("denoiser",))
    tp = TemplatePipeline(flux2_pipe, plugins=host_with(template))
    weight = tp.adapter.denoiser.proj_out.weight
    original = weight.detach().clone()
    edits = [
        lambda: _no_grad(lambda: weight.add_(1e-2)),
        lambda: _no_grad(lambda: weight.copy_(original * 0.5)),
        lambda: tp.adapter.denoiser.load_state_dict({"proj_out.weight": original * 2}, strict=False),
        lambda: setattr(weight, "data", original * 3),  # .data reassigned: a new storage
    ]
    try:
        tp.encode("reads")
        runs = 1
        for edit in edits:
            edit()
            tp.encode("reads")
            runs += 1
            assert template.runs == runs
            tp.encode("reads")
            assert template.runs == runs  # and the edited weights' entry is reused
        # torch does not count an edit through .data: forget_weight_digests is the documented remedy
        weight.data.mul_(2)
        forget_weight_digests()
        tp.encode("reads")
        assert template.runs == runs + 1
    finally:
        with torch.no_grad():
            weight.data = original.clone()
        forget_weight_digests()


class _Adapted(torch.nn.Module):
    """What PEFT's ``load_lora_weights`` does to a Linear: wraps it, adding parameters."""

    def __init__(self, base: torch.nn.Module, seed: int):
        super().__init__()
        self.base_layer = base
        g = torch.Generator().manual_seed(seed)
        self.lora_A = torch.nn.Parameter(torch.randn(2, base.in_features, generator=g))

    def forward(self, x):
        return self.base_layer(x)


def test_new_submodules_and_parameters_miss(flux2_pipe):
    template = Reads(reads=("denoiser",))
    tp = TemplatePipeline(flux2_pipe, plugins=host_with(template))
    denoiser = tp.adapter.denoiser
    original = denoiser.proj_out
    try:
        tp.encode("reads")
        torch.nn.Linear(4, 4)  # modules built elsewhere change nothing
        tp.encode("reads")
        assert template.runs == 1
        for seed in (1, 2):
            denoiser.proj_out = _Adapted(original, seed)  # the same Linear inside, new parameters beside it
            tp.encode("reads")
            assert template.runs == 1 + seed
        denoiser.proj_out = original
        tp.encode("reads")  # back to the original weights: their entry again
        assert template.runs == 3
        original.register_buffer("scale", torch.ones(3))
        tp.encode("reads")
        assert template.runs == 4
    finally:
        denoiser.proj_out = original
        original._buffers.pop("scale", None)
        forget_weight_digests()


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def test_weights_on_the_meta_device_are_not_cached(flux2_pipe):
    template = Reads(reads=("denoiser",))
    tp = TemplatePipeline(flux2_pipe, plugins=host_with(template))
    module = tp.adapter.denoiser.proj_out
    saved = module.weight
    try:
        module._parameters["weight"] = torch.nn.Parameter(torch.empty(saved.shape, device="meta"))
        tp.encode("reads")
        tp.encode("reads")
        assert template.runs == 2 and tp.store.stats.uncacheable == 2
    finally:
        module._parameters["weight"] = saved


# --------------------------------------------------------------------------------------- file inputs
def _lora_file(path: Path, pipe, seed: int, keep_times: os.stat_result | None = None) -> None:
    """A diffusers-format LoRA on the first attention projection of the tiny FLUX transformer."""
    linear = pipe.transformer.transformer_blocks[0].attn.to_q
    g = torch.Generator().manual_seed(seed)
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(
                2, linear.in_features, generator=g
            ),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(
                linear.out_features, 2, generator=g
            ),
        },
        str(path),
    )
    if keep_times is not None:
        os.utime(path, ns=(keep_times.st_atime_ns, keep_times.st_mtime_ns))


def test_a_lora_rewritten_with_the_same_size_and_mtime_misses(tmp_path, flux_pipe):
    path = tmp_path / "look.safetensors"
    _lora_file(path, flux_pipe, seed=0)
    tp = TemplatePipeline(flux_pipe)
    (previous,) = tp.encode({"template": "aesthetic", "loras": str(path)})
    for seed in (1, 2, 3):
        times = path.stat()
        _lora_file(path, flux_pipe, seed=seed, keep_times=times)
        after = path.stat()
        assert (after.st_size, after.st_mtime_ns) == (times.st_size, times.st_mtime_ns)
        (cache,) = tp.encode({"template": "aesthetic", "loras": str(path)})
        assert not torch.equal(cache.down[next(iter(cache.down))], previous.down[next(iter(previous.down))])
        previous = cache
    (again,) = tp.encode({"template": "aesthetic", "loras": str(path)})
    assert tp.store.stats.hits >= 1 and torch.equal(
        again.up[next(iter(again.up))], previous.up[next(iter(previous.up))]
    )


def test_file_digest_follows_content_not_times(tmp_path):
    path = tmp_path / "input.bin"
    seen = set()
    for seed in range(5):
        data = torch.randn(256, generator=torch.Generator().manual_seed(seed)).numpy().tobytes()
        times = path.stat() if path.exists() else None
        path.write_bytes(data)
        if times is not None:
            os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
        digest = file_digest(path)
        assert digest == hashlib.sha256(data).hexdigest() and digest == file_digest(path)
        seen.add(digest)
    assert len(seen) == 5
    with pytest.raises(NotRegularFile):
        file_digest(tmp_path)
