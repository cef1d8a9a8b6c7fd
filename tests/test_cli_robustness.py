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
    proc = run_cli("generate", "--model", str(quantized_smollm2), "--raw", "-p",
                   "The capital of France is", "--temperature", "0", "--max-new-tokens", "6",
                   "--no-compile", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    assert stats["weights"] == "int4 g32" and stats["generated_tokens"] >= 1


def test_disk_full_keeps_old_output(quantized_smollm2, monkeypatch, tmp_path):
    import safetensors.torch
    import torch

    from llmrun import quantized_format
    from llmrun.errors import LlmrunError

    before = sorted((p.name, p.stat().st_size) for p in quantized_smollm2.iterdir())
    model = quantized_format.load_quantized(quantized_smollm2, torch.float32)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(quantized_format, "save_file", full_disk)
    with pytest.raises(OSError):
        quantized_format.save_quantized(model, _tokenizer(quantized_smollm2), {"quant": "int4"},
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


@pytest.mark.parametrize("wait_for", ["load", "compil"])
def test_ctrl_c_exits_cleanly(wait_for):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    args = [sys.executable, "-m", "llmrun", "generate", "-p", "hello", "--max-new-tokens", "400"]
    if wait_for == "load":
        args += ["--quant", "none", "--no-compile"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.time() + 240
    while time.time() < deadline and not any(wait_for in line for line in lines):
        time.sleep(0.05)
    assert any(wait_for in line for line in lines), "".join(lines)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted" in err
    from llmrun.shipped import llmrun_cache_dir

    quantized = llmrun_cache_dir() / "quantized"
    if quantized.exists():  # nothing half-written: only complete entries or none
        for entry in quantized.iterdir():
            assert not entry.name.startswith("."), entry
            assert (entry / "model.safetensors").exists() and (entry / "config.json").exists()
