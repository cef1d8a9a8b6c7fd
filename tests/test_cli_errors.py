"""Bad input: one clear line on stderr, a non-zero exit, no traceback, nothing on stdout."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file


def run_cli(*args, stdin: str | None = None):
    proc = subprocess.run([sys.executable, "-m", "llmrun", *args], capture_output=True, text=True,
                          input=stdin, timeout=300, env=_env())
    return proc


def _env():
    import os

    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def assert_clean_error(proc, *needles: str):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llmrun: error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert proc.stdout == ""


def _tiny_config(**overrides):
    cfg = dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32,
               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
               max_position_embeddings=64)
    cfg.update(overrides)
    return cfg


def _tiny_dir(tmp_path, **overrides):
    (tmp_path / "config.json").write_text(json.dumps(_tiny_config(**overrides)))
    tensors = {
        "model.embed_tokens.weight": torch.randn(64, 16),
        "model.norm.weight": torch.ones(16),
        "lm_head.weight": torch.randn(64, 16),
        "model.layers.0.input_layernorm.weight": torch.ones(16),
        "model.layers.0.post_attention_layernorm.weight": torch.ones(16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(8, 16),
        "model.layers.0.self_attn.v_proj.weight": torch.randn(8, 16),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(16, 16),
        "model.layers.0.mlp.gate_proj.weight": torch.randn(32, 16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(32, 16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(16, 32),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def test_missing_path(tmp_path):
    assert_clean_error(run_cli("generate", "--model", str(tmp_path / "nope.gguf"), "-p", "hi"),
                       "nope.gguf")


def test_unknown_alias_suggests_close_names():
    assert_clean_error(run_cli("generate", "--model", "llama3.3-1b", "-p", "hi"), "llama3")


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_tiny_config()))
    assert_clean_error(run_cli("generate", "--model", str(tmp_path), "-p", "hi"), str(tmp_path))


def test_truncated_safetensors(tmp_path):
    _tiny_dir(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_clean_error(run_cli("generate", "--model", str(tmp_path), "-p", "hi"), "model.safetensors")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\xff" * 64)
    assert_clean_error(run_cli("generate", "--model", str(bad), "-p", "hi"), "bad.gguf")


def test_unsupported_architecture(tmp_path):
    _tiny_dir(tmp_path, model_type="mamba")
    assert_clean_error(run_cli("generate", "--model", str(tmp_path), "-p", "hi"), "mamba")


def test_impossible_config(tmp_path):
    _tiny_dir(tmp_path, num_attention_heads=3, num_key_value_heads=2)
    assert_clean_error(run_cli("generate", "--model", str(tmp_path), "-p", "hi"), "not a multiple")


def test_prompt_longer_than_context():
    proc = run_cli("generate", "--raw", "--prompt", "-", "--max-new-tokens", "4",
                   stdin="hello world " * 4200)  # > 8192 tokens for SmolLM2
    assert_clean_error(proc, "context")


@pytest.mark.parametrize("flag,value", [("--temperature", "-1"), ("--top-p", "1.5")])
def test_invalid_sampling_values(flag, value):
    assert_clean_error(run_cli("generate", "-p", "hi", flag, value), flag.lstrip("-"))


def test_float32_kv_cache_beside_bf16_activations():
    assert_clean_error(run_cli("generate", "-p", "hi", "--dtype", "bfloat16", "--kv-cache", "float32"),
                       "float32 KV cache needs float32 activations")
