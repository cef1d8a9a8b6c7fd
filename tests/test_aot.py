"""AOTInductor packages (llmrun.runtime.aot): a second process loads instead of compiling, a damaged
package is rebuilt, packages share the model's tensors instead of copying them."""

from __future__ import annotations

import os
import re
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
    _llmrun("warmup")  # builds the packages unless an earlier run did
    first = _llmrun(*ARGS)
    second = _llmrun(*ARGS)
    for run in (first, second):
        assert "loaded compiled prefill step" in run.stderr, run.stderr
        assert "loaded compiled decode step" in run.stderr, run.stderr
        assert "compiling" not in run.stderr and "background" not in run.stderr, run.stderr
    assert second.stdout == first.stdout and "Paris" in second.stdout


def _builders(directory, timeout=600, until=lambda jobs: not jobs):
    from llmrun.runtime.background_build import building

    deadline = time.time() + timeout
    while time.time() < deadline:
        jobs = building(directory)
        if until(jobs):
            return jobs
        time.sleep(0.2)
    raise AssertionError(f"background builders still at {building(directory)}")


def test_cold_run_answers_before_its_packages_exist_and_the_next_uses_them(tiny_hf_dir, own_cache, monkeypatch):
    from llmrun import readiness

    env, directory = {"XDG_CACHE_HOME": str(own_cache)}, own_cache / "llmrun" / "aoti"
    monkeypatch.setenv("XDG_CACHE_HOME", str(own_cache))  # for building() and readiness here
    args = ["generate", "-m", str(tiny_hf_dir), "--raw", "-p", "The capital of", "--temperature", "0",
            "--max-new-tokens", "5", "--threads", "1"]
    eager = _llmrun(*args, "--no-compile", env=env)
    cold = _llmrun(*args, env=env)  # no packages yet: answers eagerly, builds them in the background
    assert cold.stderr.count("being built in the background") == 2, cold.stderr
    assert cold.stdout == eager.stdout and cold.stdout.strip()
    assert readiness.state(str(tiny_hf_dir.resolve())) in ("compiling", "yes")
    during = _llmrun(*args, env=env)  # while they build: it waits for the same builders
    started, named = (set(re.findall(r"background \(pid (\d+)\)", run.stderr)) for run in (cold, during))
    assert named <= started, (cold.stderr, during.stderr)
    _builders(directory)
    packages = sorted(p.name.split("-")[0] for p in directory.glob("*.pt2"))
    assert packages == ["decode", "prefill"], packages
    assert readiness.state(str(tiny_hf_dir.resolve())) == "yes"
    warm = _llmrun(*args, env=env)
    assert warm.stderr.count("loaded compiled") == 2 and "background" not in warm.stderr, warm.stderr
    assert warm.stdout.strip()


def test_each_step_starts_its_builder_while_another_builds(tiny_hf_dir, tmp_path, monkeypatch):
    """A step met while another step's builder is at work starts its own builder at once (the
    cold run's decode step once waited for the prefill builder's status file to appear, so
    whether it was started depended on how fast that builder started)."""
    from llmrun.runtime import aot, background_build
    from llmrun.runtime.kv_cache import KVCache

    engine = Engine.load(EngineOptions(model=str(tiny_hf_dir), compile=False, threads=1), stream=False)
    started = []
    monkeypatch.setattr(background_build, "start", lambda options, step, cache, path: started.append(step) or 4242)
    monkeypatch.setattr(background_build, "building", lambda directory: [{"pid": 1, "state": "compiling"}])
    steps = aot.AotSteps(directory=tmp_path, background=engine.options)
    cache = KVCache(engine.config, 1, 64, engine.kv_dtype)
    assert steps._step(engine.model, cache, "prefill") is None  # runs eagerly
    assert steps._step(engine.model, cache, "decode-b1") is None
    assert started == ["prefill", "decode-b1"]
    assert steps._step(engine.model, cache, "decode-b1") is None and started == ["prefill", "decode-b1"]


def test_killed_background_build_leaves_nothing_trusted(tiny_hf_dir, own_cache, monkeypatch):
    import signal

    env, directory = {"XDG_CACHE_HOME": str(own_cache)}, own_cache / "llmrun" / "aoti"
    monkeypatch.setenv("XDG_CACHE_HOME", str(own_cache))
    args = ["generate", "-m", str(tiny_hf_dir), "--raw", "-p", "The capital of", "--temperature", "0",
            "--max-new-tokens", "3", "--threads", "1"]
    _llmrun(*args, env=env)
    jobs = _builders(directory, 120, lambda jobs: any(j["state"] == "compiling" for j in jobs))
    for job in jobs:  # its compilers too: a builder leads its own process group
        os.killpg(job["pid"], signal.SIGKILL)
    _builders(directory, 60)
    assert not [p for p in directory.iterdir() if p.name.endswith(".pt2")]
    again = _llmrun(*args, env=env)  # the killed build is not trusted: built again
    assert again.stderr.count("being built in the background") == 2, again.stderr
    for job in _builders(directory, 60, lambda jobs: jobs):  # not left running past the test
        os.killpg(job["pid"], signal.SIGKILL)


def test_damaged_package_is_rebuilt_and_stale_ones_deleted(tiny_hf_dir, own_cache):
    from llmrun.runtime.aot import STALE_DAYS

    env = {"XDG_CACHE_HOME": str(own_cache)}
    model = ["-m", str(tiny_hf_dir), "--threads", "1"]
    args = ["generate", *model, "--raw", "-p", "The capital of", "--temperature", "0", "--max-new-tokens", "5"]
    directory = own_cache / "llmrun" / "aoti"
    directory.mkdir(parents=True)
    day = 86400
    stale, recent = directory / "decode-stale.pt2", directory / "decode-recent.pt2"
    for path, age in ((stale, STALE_DAYS + 1), (recent, STALE_DAYS - 1)):
        path.write_bytes(b"old")
        os.utime(path, (time.time() - age * day,) * 2)
    _llmrun("warmup", *model, env=env)
    first = _llmrun(*args, env=env)
    assert not stale.exists() and recent.exists()  # building a package deleted the stale one
    recent.unlink()
    packages = sorted(directory.glob("*.pt2"))
    assert [p.name.split("-")[0] for p in packages] == ["decode", "prefill"], packages
    for p in packages:
        p.write_bytes(b"PK\x03\x04 not a package")
    rebuilt = _llmrun("warmup", *model, env=env)
    assert rebuilt.stderr.count("rebuilding the compiled") == 2, rebuilt.stderr
    second = _llmrun(*args, env=env)
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


def test_a_package_another_process_is_building_is_waited_for_and_loaded(tiny_hf_dir, tmp_path, monkeypatch):
    """Two processes that need the same missing package (two replicas, a second server) take
    turns: the later one waits for the first's build, then loads it instead of compiling."""
    import fcntl
    import threading

    from llmrun.runtime import aot
    from llmrun.runtime.kv_cache import KVCache

    engine = Engine.load(EngineOptions(model=str(tiny_hf_dir), compile=False, threads=1), stream=False)
    cache = KVCache(engine.config, 1, 64, engine.kv_dtype)
    path = aot.package_path(tmp_path, aot._Step(engine.model, cache, True), "prefill")
    built, loaded = [], []
    monkeypatch.setattr(aot, "build_package", lambda module, step, p: built.append(p))
    monkeypatch.setattr(aot, "_Bound", lambda p, module: loaded.append(p) or type("B", (), {"run": "runner"})())
    steps = aot.AotSteps(directory=tmp_path)

    (tmp_path / "building").mkdir()
    with open(tmp_path / "building" / f"{path.stem}.lock", "w") as lock:  # the other process, building
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = []
        waiter = threading.Thread(target=lambda: result.append(steps._step(engine.model, cache, "prefill")))
        waiter.start()
        waiter.join(timeout=2)
        assert waiter.is_alive() and not built  # waits rather than compiling beside it
        path.write_bytes(b"a package")  # the other process's build lands
    waiter.join(timeout=30)
    assert result == ["runner"] and loaded == [path] and built == []
