"""Qwen 2, 2.5 and 3 (dense): Llama's layout with its own deltas.

Qwen 2 / 2.5: biases on q, k and v (none on o), rope theta 1e6, YaRN where config declares it,
              sliding-window attention on the layers past max_window_layers when enabled.
Qwen 3:       no biases, RMSNorm on q and k per head, head_dim given apart from dim / heads."""

from __future__ import annotations

from collections.abc import Iterator

from llmrun.models.config import ModelConfig
from llmrun.models.gguf_config import GGUFMetadata, common_fields as gguf_fields
from llmrun.models.gguf_names import hf_name
from llmrun.models.hf_config import common_fields, layer_types

MODEL_TYPES = ("qwen2", "qwen3")
GGUF_ARCHS = ("qwen2", "qwen3")
GGUF_CONTROL_TOKENS: frozenset[str] = frozenset()
CHAT_TEMPLATE = None  # Qwen files carry theirs; ChatML otherwise (tokenizer.chat_template)


def _layer_types(d: dict, n_layers: int) -> tuple[str, ...]:
    """config.layer_types (transformers 5), else sliding from max_window_layers on when enabled."""
    if d.get("layer_types"):
        return layer_types(d, n_layers, None)
    if d.get("use_sliding_window") and d.get("sliding_window"):
        start = int(d.get("max_window_layers", n_layers))
        return tuple("sliding" if i >= start else "full" for i in range(n_layers))
    return ("full",) * n_layers


def config_from_hf(d: dict) -> ModelConfig:
    family = d["model_type"]
    fields = common_fields(d)
    fields["layer_types"] = _layer_types(d, fields["n_layers"])
    if "sliding" in fields["layer_types"]:
        fields["sliding_window"] = int(d["sliding_window"])
    if family == "qwen2":
        biases = dict(qkv_bias=True, o_bias=False)
    else:
        bias = bool(d.get("attention_bias", False))  # False in every Qwen 3 release
        biases = dict(qkv_bias=bias, o_bias=bias)
    return ModelConfig(family=family, activation="silu", qk_norm=family == "qwen3", **biases, **fields)


def config_from_gguf(meta: GGUFMetadata) -> ModelConfig:
    names = set(meta.tensor_names)
    return ModelConfig(family=meta.arch, activation="silu", qk_norm="blk.0.attn_q_norm.weight" in names,
                       qkv_bias="blk.0.attn_q.bias" in names, o_bias="blk.0.attn_output.bias" in names,
                       **gguf_fields(meta))


def hf_tensors(name: str, tensor, cfg: ModelConfig) -> Iterator[tuple[str, object]]:
    yield name, tensor


def gguf_tensors(name: str, tensor, cfg: ModelConfig) -> Iterator[tuple[str, object]]:
    name = hf_name(name, "qwen", {"ffn_norm": "post_attention_layernorm"})
    if name is not None:  # llama.cpp runs Qwen's rope in rotate-half form: rows as in the checkpoint
        yield name, tensor
