"""Robustness of the command line: Ctrl-C, output directories, the context limit, and
empty prompts. One clear line, a non-zero exit, no traceback, nothing half-written."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.test_cli_errors import assert_clean_error, run_cli


@pytest.fixture(scope="module")
def quantized_smollm2(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "smollm2-g32"
    proc = run_cli("quantize", "--model", "smollm2-135m", "--group-size", "32", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_quantize_refuses_existing_output(quantized_smollm2):
    proc = run_cli("quantize", "--model", "smollm2-135m", "--out", str(quantized_smollm2))
    assert_clean_error(proc, "--force")


def test_quantized_directory_generates(quantized_smollm2):
    # a prompt the int4 model answers with a margin (see tests/test_compiled.py)
    proc = run_cli("generate", "--model", str(quantized_smollm2), "--raw", "-p",
                   "The Eiffel Tower is in the city of", "--temperature", "0", "--max-new-tokens", "6",
                   "--no-compile", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    assert stats["weights"] == "as shipped (Q4_1, Q8_0)" and stats["generated_tokens"] >= 1


def test_disk_full_keeps_old_output(quantized_smollm2, monkeypatch, tmp_path):
    import safetensors.torch
    import torch

    from llmrun.errors import LlmrunError
    from llmrun.formats import quantized_dir

    before = sorted((p.name, p.stat().st_size) for p in quantized_smollm2.iterdir())
    model = quantized_dir.load_quantized(quantized_smollm2, torch.float32)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(quantized_dir, "save_file", full_disk)
    with pytest.raises(OSError):
        quantized_dir.save_quantized(model, _tokenizer(quantized_smollm2), {"quant": "int4"},
                                   quantized_smollm2, force=True)
    after = sorted((p.name, p.stat().st_size) for p in quantized_smollm2.iterdir())
    assert after == before
    leftovers = [p.name for p in quantized_smollm2.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    del safetensors, LlmrunError


def _tokenizer(directory):
    from llmrun.tokenizer import Tokenizer

    return Tokenizer.from_hf_dir(directory)


def test_max_new_tokens_past_the_context_stops_there(quantized_smollm2, tmp_path):
    small = tmp_path / "small-context"
    small.mkdir()
    for f in quantized_smollm2.iterdir():
        (small / f.name).symlink_to(f)
    config = json.loads((quantized_smollm2 / "config.json").read_text())
    config["llmrun"]["model_config"]["max_seq_len"] = 24
    (small / "config.json").unlink()
    (small / "config.json").write_text(json.dumps(config))
    proc = run_cli("generate", "--model", str(small), "--raw", "-p", "One two three four five",
                   "--max-new-tokens", "100", "--no-compile", "--json", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert "stopped at the model's context length (24 tokens)" in proc.stderr
    stats = json.loads([l for l in proc.stderr.splitlines() if l.startswith("{")][-1])
    assert stats["finish_reason"] == "context"
    assert stats["prompt_tokens"] + stats["generated_tokens"] == 24


def test_empty_prompt():
    assert_clean_error(run_cli("generate", "--prompt", "   "), "empty")


def _interrupt_when(args, stream: str, marker: str, env=None):
    """Start llmrun, send SIGINT once `marker` shows on `stream`; return (exit code, stderr)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    # as from a terminal: SIGINT handled, even where pytest runs with it ignored (a job started
    # in the background by a non-interactive shell), which Python would then leave ignored
    proc = subprocess.Popen([sys.executable, "-m", "llmrun", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = {"stdout": [], "stderr": []}
    readers = [threading.Thread(target=lambda n=n: seen[n].extend(iter(lambda: getattr(proc, n).read(1), "")),
                                daemon=True) for n in seen]
    for r in readers:
        r.start()
    deadline = time.time() + 240
    while time.time() < deadline and marker not in "".join(seen[stream]):
        time.sleep(0.05)
    assert marker in "".join(seen[stream]), "".join(seen["stderr"])
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    for r in readers:
        r.join(timeout=10)
    return proc.returncode, "".join(seen["stderr"])


def _assert_interrupted(code, err):
    assert code == 130, err
    assert "Traceback" not in err
    assert "interrupted" in err


@pytest.mark.parametrize("stage", ["load", "compile", "aot-build", "generation"])
def test_ctrl_c_exits_cleanly(stage, tmp_path):
    from llmrun.cache_dir import llmrun_cache_dir

    args = ["generate", "-p", "Tell me a long story.", "--max-new-tokens", "400"]
    if stage == "load":
        code, err = _interrupt_when(args + ["--quant", "none", "--no-compile"], "stderr", "load")
    elif stage == "compile":
        code, err = _interrupt_when(args + ["--compile-backend", "jit"], "stderr", "compiling")
    elif stage == "aot-build":  # a cache without AOTInductor packages (kernels and quantized reused)
        (tmp_path / "llmrun").mkdir()
        for part in ("ext", "quantized"):
            (llmrun_cache_dir() / part).mkdir(parents=True, exist_ok=True)
            (tmp_path / "llmrun" / part).symlink_to(llmrun_cache_dir() / part)
        code, err = _interrupt_when(["warmup"], "stderr", "compiling", env={"XDG_CACHE_HOME": str(tmp_path)})
        assert not list(tmp_path.rglob("*.pt2")), "a half-built package was left"
    else:
        code, err = _interrupt_when(args + ["--quant", "none", "--no-compile"], "stdout", " ")
    _assert_interrupted(code, err)
    for kept, meta in (("quantized", "config.json"), ("prepared", "prepared.json")):
        kept = llmrun_cache_dir() / kept
        if kept.exists():  # nothing half-written: only complete entries
            for entry in kept.iterdir():
                assert not entry.name.startswith("."), entry
                assert (entry / "model.safetensors").exists() and (entry / meta).exists()


def test_ctrl_c_during_quantize_leaves_nothing(tmp_path):
    out = tmp_path / "q"
    code, err = _interrupt_when(["quantize", "--model", "smollm2-135m", "--group-size", "128",
                                 "--out", str(out)], "stderr", "quantize")
    _assert_interrupted(code, err)
    assert list(tmp_path.iterdir()) == []


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    """A fresh machine without a C++ compiler: the reference backend, one warning."""
    code = ("import warnings; warnings.simplefilter('always'); "
            "from llmrun.kernels import available_backends, Int4Linear, quantize_int4; import torch; "
            "q, s = quantize_int4(torch.randn(16, 64), 32); "
            "m = Int4Linear.from_neutral(q, s, 32, 64); print(available_backends(), m.backend); "
            "print(m(torch.randn(2, 64)).shape)")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), CXX="/nonexistent/c++",
               PATH="/nonexistent")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "['reference'] reference" in proc.stdout and "torch.Size([2, 16])" in proc.stdout
    warnings_seen = [l for l in proc.stderr.splitlines() if "no C++ compiler" in l]
    assert len(warnings_seen) == 1, proc.stderr


def test_no_compiler_answers_eagerly_and_starts_no_builders(tiny_hf_dir, tmp_path):
    """Without a C++ compiler a compiled run answers eagerly on the reference kernels, and
    starts no background builders (AOTInductor could not build their packages either)."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), CXX="/nonexistent/c++",
               PATH=os.path.dirname(sys.executable))
    proc = subprocess.run([sys.executable, "-m", "llmrun", "generate", "-m", str(tiny_hf_dir), "--raw", "-p",
                           "The capital of", "--temperature", "0", "--max-new-tokens", "4"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("AOTInductor needs a C++ compiler") == 2, proc.stderr  # prefill and decode
    assert "background" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.strip()
    assert not list((tmp_path / "llmrun" / "aoti").glob("building/*.json"))


def test_corrupt_extension_cache_is_rebuilt(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    where = subprocess.run([sys.executable, "-c", "from llmrun.kernels import native; print(native._ops_library())"],
                           capture_output=True, text=True, env=env, timeout=120)
    library = __import__("pathlib").Path(where.stdout.strip())
    library.parent.mkdir(parents=True)
    library.write_bytes(b"not a shared library")
    code = "from llmrun.kernels import native; print(native.built(), native.supported_isas())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "True" in proc.stdout and ("x86-avx512vnni" in proc.stdout or "x86-avx2" in proc.stdout), \
        proc.stdout + proc.stderr
    assert library.stat().st_size > 1000


def test_corrupt_compile_cache_is_survived(tmp_path, tiny_hf_dir):
    """Every file of inductor's cache overwritten with garbage: the next run recompiles. (The
    jit backend lives on inductor's cache; damaged AOT packages: tests/test_aot.py.) A tiny
    model: two compiles of a real one would cost minutes."""
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    args = ["generate", "-m", str(tiny_hf_dir), "--raw", "-p", "The capital of France is", "--temperature", "0",
            "--max-new-tokens", "4", "--compile-backend", "jit", "--threads", "1"]
    first = subprocess.run([sys.executable, "-m", "llmrun", *args], capture_output=True, text=True,
                           env=dict(os.environ, **env), timeout=600)
    assert first.returncode == 0, first.stderr
    files = [p for p in (tmp_path / "inductor").rglob("*") if p.is_file()]
    assert files
    for p in files:
        p.write_bytes(b"\x00garbage")
    second = subprocess.run([sys.executable, "-m", "llmrun", *args], capture_output=True, text=True,
                            env=dict(os.environ, **env), timeout=600)
    assert second.returncode == 0, second.stderr
    assert "Traceback" not in second.stderr
    assert second.stdout == first.stdout
