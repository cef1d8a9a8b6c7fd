"""A quantized model as it runs on this machine is kept (llmrun.formats.prepared_dir) and mapped
by the next load: the same modules, the same tensors bit for bit, the same logits, nothing
copied; a stale or damaged entry is prepared again, never trusted; a warm `generate` imports
nothing of torch's compiler."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from llmrun.formats import prepared_dir
from llmrun.kernels import available_backends
from llmrun.quant.schemes import Scheme
from llmrun.runtime.aot import _Step, package_key
from llmrun.runtime.kv_cache import KVCache
from llmrun.runtime.pipeline import load

SCHEMES = {  # every runtime module kind: block and int4 layers, int8 / int4 / rescored heads
    "asymmetric-rescored": Scheme("int4", 32, "int4-rescored"),
    "symmetric-int8-head": Scheme("int4", 32, "int8", int4="symmetric"),
    "per-channel-int4-head": Scheme("int4", 0, "int4", int4="symmetric"),
}


@pytest.fixture
def cache_home(own_cache, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(own_cache))
    return own_cache


def _entries(cache_home):
    return sorted((cache_home / "llmrun" / "prepared").glob("*/prepared.json"))


def _same_model(a, b):
    assert repr(a) == repr(b)
    ta, tb = a.state_dict(), b.state_dict()  # the neutral tensors, re-derived from the packed ones
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    packed_a = list(a.named_buffers())  # in one order: compiled packages are keyed by it
    assert [key for key, _ in packed_a] == [key for key, _ in b.named_buffers()]
    for (key, t), (_, u) in zip(packed_a, b.named_buffers()):
        assert torch.equal(t, u), key
    ids = torch.tensor([[5, 17, 3, 200, 31, 8, 99]])
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
    cache = KVCache(a.config, 1, 512, torch.float32)
    for step in ("prefill", "decode-b1"):  # both find the same compiled packages
        assert package_key(_Step(a, cache, step == "prefill"), step) == package_key(
            _Step(b, cache, step == "prefill"), step)


def _mapped_ranges(path):
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(str(path)):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                ranges.append((lo, hi))
    return ranges


@pytest.mark.parametrize("scheme", SCHEMES.values(), ids=SCHEMES.keys())
@pytest.mark.parametrize("backend", ["default", "x86-avx2"])
def test_mapped_model_is_the_prepared_one(tiny_hf_dir, cache_home, monkeypatch, scheme, backend):
    if backend != "default":
        if backend not in available_backends():
            pytest.skip(f"this CPU lacks {backend}")
        monkeypatch.setenv("LLMRUN_KERNEL_BACKEND", backend)
    fresh = load(str(tiny_hf_dir), scheme, torch.float32)  # quantizes, prepares, keeps both
    assert len(_entries(cache_home)) == 1
    messages = []
    mapped = load(str(tiny_hf_dir), scheme, torch.float32,
                  report=lambda p: messages.append(p.message or ""))
    assert any("mapping the prepared model" in m for m in messages), messages
    assert mapped.scheme == fresh.scheme and mapped.model.attention == fresh.model.attention
    _same_model(fresh.model, mapped.model)
    assert mapped.tokenizer.encode("The capital of France is Paris") == fresh.tokenizer.encode(
        "The capital of France is Paris")


def test_mapped_tensors_are_the_files_pages(smollm2_path, cache_home):
    """The shipped model as shipped: its packed panels are read in place from the entry's file."""
    load(None, Scheme("int4", 32, "int4-rescored"), torch.float32)
    mapped = load(None, Scheme("int4", 32, "int4-rescored"), torch.float32)
    (entry,) = _entries(cache_home)
    ranges = _mapped_ranges(entry.parent / "model.safetensors")
    assert ranges
    tensors = list(mapped.model.named_buffers())
    assert len(tensors) > 100
    for name, t in tensors:
        if t.numel():  # (an empty tensor has no pages: a symmetric layer's offsets)
            assert any(lo <= t.data_ptr() < hi for lo, hi in ranges), name


def test_stale_or_damaged_entry_is_prepared_again(tiny_hf_dir, cache_home):
    scheme = SCHEMES["asymmetric-rescored"]
    fresh = load(str(tiny_hf_dir), scheme, torch.float32)
    (meta,) = _entries(cache_home)
    record = json.loads(meta.read_text())
    meta.write_text(json.dumps({**record, "key": "from another llmrun"}))
    messages = []
    again = load(str(tiny_hf_dir), scheme, torch.float32, report=lambda p: messages.append(p.message or ""))
    assert not any("mapping" in m for m in messages), messages
    assert json.loads(meta.read_text())["key"] == record["key"]  # rewritten for this llmrun
    _same_model(fresh.model, again.model)

    weights = meta.parent / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])  # half-written, say by a full disk
    messages = []
    again = load(str(tiny_hf_dir), scheme, torch.float32, report=lambda p: messages.append(p.message or ""))
    assert any("preparing the model again" in m for m in messages), messages
    _same_model(fresh.model, again.model)
    assert _entries(cache_home) == [meta]
    assert not [p for p in meta.parent.parent.iterdir() if p.name.startswith(".")]  # no leftovers


def test_only_known_module_types_are_made_from_a_file(tiny_hf_dir, cache_home):
    load(str(tiny_hf_dir), SCHEMES["asymmetric-rescored"], torch.float32)
    (meta,) = _entries(cache_home)
    record = json.loads(meta.read_text())
    name = next(iter(record["modules"]))
    record["modules"][name]["type"] = "Popen"
    meta.write_text(json.dumps(record))
    with pytest.raises(Exception, match="unknown type 'Popen'"):
        prepared_dir.load_prepared(meta.parent)


def test_warm_generate_imports_no_compiler(own_cache):
    """A warm `generate --no-compile` builds no parameters with initializers and imports
    nothing of torch's compiler (torch._dynamo alone costs ~1 s of a warm start)."""
    env = dict(os.environ, XDG_CACHE_HOME=str(own_cache))
    args = ["generate", "--raw", "-p", "The capital of France is", "--max-new-tokens", "4",
            "--temperature", "0", "--no-compile"]
    code = ("import sys, runpy; sys.argv = ['llmrun', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('llmrun', run_name='__main__')\n"
            "finally:\n    print('imported:', sorted(m for m in ('torch._dynamo', 'torch._inductor', 'sympy') "
            "if m in sys.modules), file=sys.stderr)\n")
    outputs = []
    for _ in range(2):  # the first run quantizes and prepares; the second maps
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    assert "mapping the prepared model" in proc.stderr
    assert "imported: []" in proc.stderr, proc.stderr
    assert outputs[0] == outputs[1] and outputs[0].strip()
