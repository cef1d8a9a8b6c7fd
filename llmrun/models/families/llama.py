"""Llama 2/3/3.1/3.2, SmolLM2 and Mistral: the base architecture, no deltas."""

from __future__ import annotations

from collections.abc import Iterator

from llmrun.models.config import ModelConfig
from llmrun.models.gguf_config import GGUFMetadata, common_fields as gguf_fields
from llmrun.models.gguf_names import hf_name
from llmrun.models.hf_config import common_fields
from llmrun.models.tensors import unpermute_qk

MODEL_TYPES = ("llama", "mistral")
GGUF_ARCHS = ("llama",)
GGUF_CONTROL_TOKENS: frozenset[str] = frozenset()
CHAT_TEMPLATE = None


def config_from_hf(d: dict) -> ModelConfig:
    fields = common_fields(d)
    bias = bool(d.get("attention_bias", False))
    window = d.get("sliding_window")
    if window:  # Mistral 7B v0.1
        fields.update(sliding_window=int(window), layer_types=("sliding",) * fields["n_layers"])
    return ModelConfig(family="llama", activation="silu", qkv_bias=bias, o_bias=bias, **fields)


def config_from_gguf(meta: GGUFMetadata) -> ModelConfig:
    return ModelConfig(family="llama", activation="silu", **gguf_fields(meta))


def hf_tensors(name: str, tensor, cfg: ModelConfig) -> Iterator[tuple[str, object]]:
    if not name.endswith("rotary_emb.inv_freq"):  # older checkpoints store rope's frequencies
        yield name, tensor


def gguf_tensors(name: str, tensor, cfg: ModelConfig) -> Iterator[tuple[str, object]]:
    name = hf_name(name, "llama", {"ffn_norm": "post_attention_layernorm"})
    if name is None:
        return
    # llama.cpp runs Llama's rope on interleaved pairs: its converter permuted q and k rows
    if name.endswith("q_proj.weight"):
        tensor = unpermute_qk(tensor, cfg.n_heads)
    elif name.endswith("k_proj.weight"):
        tensor = unpermute_qk(tensor, cfg.n_kv_heads)
    yield name, tensor
