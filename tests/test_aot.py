"""AOTInductor packages (llmrun.runtime.aot): a second process loads instead of compiling, a damaged
package is rebuilt, packages share the model's tensors instead of copying them."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

from llmrun.runtime.engine import Engine, EngineOptions
from llmrun.runtime.types import SamplingSettings

ARGS = ["generate", "--raw", "-p", "The Eiffel Tower is in the city of", "--temperature", "0",
        "--max-new-tokens", "6"]


def _llmrun(*args, env=None):
    proc = subprocess.run([sys.executable, "-m", "llmrun", *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def test_second_process_loads_packages_instead_of_compiling():
    first = _llmrun(*ARGS)  # builds the packages unless an earlier run did
    second = _llmrun(*ARGS)
    assert "loaded compiled prefill step" in second.stderr, second.stderr
    assert "loaded compiled decode step" in second.stderr, second.stderr
    assert "compiling" not in second.stderr, second.stderr
    assert second.stdout == first.stdout and "Paris" in second.stdout


def test_damaged_package_is_rebuilt_and_stale_ones_deleted(tiny_hf_dir, tmp_path):
    from llmrun.cache_dir import llmrun_cache_dir
    from llmrun.runtime.aot import STALE_DAYS

    env = {"XDG_CACHE_HOME": str(tmp_path)}
    args = ["generate", "-m", str(tiny_hf_dir), "--raw", "-p", "The capital of", "--temperature", "0",
            "--max-new-tokens", "5", "--threads", "1"]
    directory = tmp_path / "llmrun" / "aoti"
    directory.mkdir(parents=True)
    (llmrun_cache_dir() / "ext").mkdir(parents=True, exist_ok=True)
    (tmp_path / "llmrun" / "ext").symlink_to(llmrun_cache_dir() / "ext")  # the kernels, not rebuilt
    day = 86400
    stale, recent = directory / "decode-stale.pt2", directory / "decode-recent.pt2"
    for path, age in ((stale, STALE_DAYS + 1), (recent, STALE_DAYS - 1)):
        path.write_bytes(b"old")
        os.utime(path, (time.time() - age * day,) * 2)
    first = _llmrun(*args, env=env)
    assert not stale.exists() and recent.exists()  # building a package deleted the stale one
    recent.unlink()
    packages = sorted(directory.glob("*.pt2"))
    assert [p.name.split("-")[0] for p in packages] == ["decode", "prefill"], packages
    for p in packages:
        p.write_bytes(b"PK\x03\x04 not a package")
    second = _llmrun(*args, env=env)
    assert second.stderr.count("rebuilding the compiled") == 2, second.stderr
    assert second.stdout == first.stdout
    assert all(p.stat().st_size > 10000 for p in packages)
    for p in packages:  # unused for long, then loaded: marked as used
        os.utime(p, (time.time() - (STALE_DAYS + 1) * day,) * 2)
    third = _llmrun(*args, env=env)
    assert third.stderr.count("loaded compiled") == 2 and third.stdout == first.stdout
    assert all(p.stat().st_mtime > time.time() - day for p in packages)


def test_packages_use_the_models_tensors_without_copies(tiny_hf_dir):
    engine = Engine.load(EngineOptions(model=str(tiny_hf_dir), quant="int4", compile=True, threads=1))
    steps = engine.generator.decode_fn.__self__
    bound = steps._bound["decode-b1"]
    ours = {id(t) for t in engine.model.state_dict(keep_vars=True).values()}
    ours |= {id(b) for b in engine.model.buffers()} | {id(b) for b in engine.generator.cache.buffers()}
    assert bound.constants and all(id(t) in ours for t in bound.constants.values())
    # the KV cache the package writes is the generator's own: a prefill through the package fills it
    cache = engine.generator.cache.layer(0)[0]
    with torch.inference_mode():  # the cache is an inference tensor
        cache.zero_()
    list(engine.stream_generate(engine.tokenizer.encode("The capital of"),
                                SamplingSettings(max_new_tokens=1, temperature=0)))
    assert cache.abs().sum() > 0


def test_build_failure_is_one_clear_error(tiny_hf_dir, tmp_path, monkeypatch):
    import pytest

    from llmrun.errors import LlmrunError
    from llmrun.runtime import aot

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no cached packages

    def broken(*args, **kwargs):
        raise RuntimeError("c++: internal compiler error\nmany more lines")

    monkeypatch.setattr(aot, "build_package", broken)
    with pytest.raises(LlmrunError, match=r"compiling the prefill step .* failed \(RuntimeError: "
                       r"c\+\+: internal compiler error\); run with --no-compile"):
        Engine.load(EngineOptions(model=str(tiny_hf_dir), quant="int4", compile=True, threads=1))


def _live_cpu_tensors() -> dict[int, int]:
    """data_ptr -> bytes of every real (not fake) tensor's storage that gc can see."""
    import gc

    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in gc.get_objects() if type(t) is torch.Tensor and t.device.type == "cpu"}


def test_building_a_package_neither_copies_nor_keeps_weights(tiny_hf_dir, tmp_path):
    from torch.utils._python_dispatch import TorchDispatchMode

    from llmrun.runtime import aot

    engine = Engine.load(EngineOptions(model=str(tiny_hf_dir), quant="int4", compile=False, threads=1))
    step = aot._Step(engine.model, engine.generator.ensure_cache(64), last_only=False)
    tensors = aot._named_tensors(step)
    weight_bytes = sum(t.untyped_storage().nbytes() for t in tensors.values())
    created: list[int] = []

    class CountNewTensors(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            created.extend(o.untyped_storage().nbytes() for o in (out if isinstance(out, (list, tuple)) else [out])
                           if type(o) is torch.Tensor)  # real tensors only: tracing makes fake ones
            return out

    before = _live_cpu_tensors()
    with CountNewTensors():
        aot.build_package(step, "decode-b1", tmp_path / "decode.pt2")
    kept = {p: n for p, n in _live_cpu_tensors().items() if p not in before}
    # torch's own habit was a clone of every buffer (the packed weights), kept until the next trace
    assert sum(created) < weight_bytes // 100, (sum(created), weight_bytes)
    assert sum(kept.values()) < weight_bytes // 100, kept


def test_batched_decode_packages_give_each_request_its_single_stream_tokens(tiny_hf_dir):
    """A scheduler on AOT steps: its decode runs the packages of batch 1, 2 and 4 (three
    requests, padded to four rows) and each request gets what the compiled single stream gives."""
    engine = Engine.load(EngineOptions(model=str(tiny_hf_dir), compile=True, threads=1))
    prompts = [[1, 3, 4, 5], [1, 6, 7, 8, 9, 10], [1, 11, 12]]
    greedy = SamplingSettings(max_new_tokens=10, temperature=0)
    alone = [[c.token for c in engine.stream_generate(p, greedy, ignore_eos=True) if c.token is not None]
             for p in prompts]
    scheduler = engine.scheduler(3, 64)
    steps = scheduler.decode_fn.__self__
    try:
        for round in range(2):  # the second reuses every package the first built
            built = list(steps.built)
            requests = [scheduler.submit(p, greedy, ignore_eos=True) for p in prompts]
            assert [[c.token for c in r if c.token is not None] for r in requests] == alone
            assert round == 0 or steps.built == built
    finally:
        scheduler.close()
    assert {"decode-b2", "decode-b4"} <= set(steps._bound) and "decode-b3" not in steps._bound
