"""Corrupt and mismatched checkpoints: every case is one LlmrunError, never another
exception; a hypothesis fuzz test mutates real headers and asserts the same."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from llmrun.errors import LlmrunError
from llmrun.formats.checkpoint import load_model, open_checkpoint

CONFIG = dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32,
              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=64)


def tiny_tensors():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "model.embed_tokens.weight": r(64, 16), "model.norm.weight": torch.ones(16),
        "lm_head.weight": r(64, 16),
        "model.layers.0.input_layernorm.weight": torch.ones(16),
        "model.layers.0.post_attention_layernorm.weight": torch.ones(16),
        "model.layers.0.self_attn.q_proj.weight": r(16, 16),
        "model.layers.0.self_attn.k_proj.weight": r(8, 16),
        "model.layers.0.self_attn.v_proj.weight": r(8, 16),
        "model.layers.0.self_attn.o_proj.weight": r(16, 16),
        "model.layers.0.mlp.gate_proj.weight": r(32, 16),
        "model.layers.0.mlp.up_proj.weight": r(32, 16),
        "model.layers.0.mlp.down_proj.weight": r(16, 32),
    }


def write_hf(directory, tensors=None, **config):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**CONFIG, **config}))
    save_file(tensors if tensors is not None else tiny_tensors(), directory / "model.safetensors")
    return directory


def load_hf(directory):
    return load_model(open_checkpoint(directory, "hf-dir"), torch.float32)


def test_valid_tiny_model_loads(tmp_path):
    model = load_hf(write_hf(tmp_path))
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 64)


@pytest.mark.parametrize("case,needle", [
    ("missing", "missing tensors"),
    ("extra", "unexpected tensor"),
    ("shape", "shape"),
    ("dtype", "dtype"),
])
def test_mismatched_safetensors(tmp_path, case, needle):
    tensors = tiny_tensors()
    if case == "missing":
        del tensors["model.layers.0.mlp.up_proj.weight"]
    elif case == "extra":
        tensors["model.layers.0.mlp.extra.weight"] = torch.ones(3)
    elif case == "shape":
        tensors["model.layers.0.mlp.up_proj.weight"] = torch.ones(31, 16)
    else:
        tensors["model.layers.0.mlp.up_proj.weight"] = torch.ones(32, 16, dtype=torch.int32)
    with pytest.raises(LlmrunError, match=needle):
        load_hf(write_hf(tmp_path, tensors))


def test_header_length_past_the_file(tmp_path):
    write_hf(tmp_path)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 10)
    path.write_bytes(bytes(data))
    with pytest.raises(LlmrunError, match="model.safetensors"):
        load_hf(tmp_path)


@pytest.mark.parametrize("config,needle", [
    (dict(num_attention_heads=3), "multiple"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "n_kv_heads"),
    (dict(hidden_size=None), "hidden_size"),
    (dict(num_hidden_layers=0), "n_layers"),
    (dict(vocab_size="many"), "vocab_size"),
])
def test_bad_config_values(tmp_path, config, needle):
    with pytest.raises(LlmrunError, match=needle):
        load_hf(write_hf(tmp_path, **config))


def write_gguf(path, arch="llama", qtype=None):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(16)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(64)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    block = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for name, t in tiny_tensors().items():
        if name.startswith("model.layers.0."):
            part = name[len("model.layers.0."):-len(".weight")]
            gname = f"blk.0.{block[part]}.weight"
        else:
            gname = names[name]
        writer.add_tensor(gname, t.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def load_gguf(path):
    return load_model(open_checkpoint(path, "gguf"), torch.float32)


def test_valid_tiny_gguf_loads(tmp_path):
    model = load_gguf(write_gguf(tmp_path / "m.gguf"))
    assert model(torch.tensor([[1, 2]])).shape == (1, 2, 64)


def test_gguf_bad_magic(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    data[:4] = b"GGUX"
    path.write_bytes(bytes(data))
    with pytest.raises(LlmrunError, match="GGUF"):
        load_gguf(path)


def test_gguf_truncated_tensor_data(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    with pytest.raises(LlmrunError):
        load_gguf(path)


def test_gguf_unknown_architecture(tmp_path):
    with pytest.raises(LlmrunError, match="mamba"):
        load_gguf(write_gguf(tmp_path / "m.gguf", arch="mamba"))


def test_gguf_unknown_quant_type(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    import gguf

    reader = gguf.GGUFReader(path)
    offset = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight").field.offset
    data = bytearray(path.read_bytes())
    # tensor info: name (u64 len + bytes), n_dims u32, dims u64 * n, type u32, offset u64
    name_len = struct.unpack_from("<Q", data, offset)[0]
    n_dims_at = offset + 8 + name_len
    n_dims = struct.unpack_from("<I", data, n_dims_at)[0]
    struct.pack_into("<I", data, n_dims_at + 4 + 8 * n_dims, 200)  # no such ggml type
    path.write_bytes(bytes(data))
    with pytest.raises(LlmrunError):
        load_gguf(path)


def _mutate(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=6),
       truncate=st.one_of(st.none(), st.integers(1, 4096)))
def test_fuzz_gguf_header(tmp_path_factory, edits, truncate):
    base = tmp_path_factory.getbasetemp() / "fuzz-base.gguf"
    if not base.exists():
        write_gguf(base)
    data = base.read_bytes()
    header = min(len(data), 4096)
    mutated = _mutate(data[:header], edits) + data[header:]
    if truncate is not None:
        mutated = mutated[: max(0, len(mutated) - truncate)]
    path = tmp_path_factory.mktemp("fuzz") / "m.gguf"
    path.write_bytes(mutated)
    try:
        load_gguf(path)
    except LlmrunError:
        pass


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzz_safetensors_header(tmp_path_factory, edits):
    base = tmp_path_factory.getbasetemp() / "fuzz-base"
    if not (base / "model.safetensors").exists():
        write_hf(base)
    directory = tmp_path_factory.mktemp("fuzz")
    (directory / "config.json").write_text((base / "config.json").read_text())
    data = (base / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(_mutate(data[:1024], edits) + data[1024:])
    try:
        load_hf(directory)
    except LlmrunError:
        pass
