"""Phi-3 and Phi-3.5 (mini, medium): Llama's layer with q/k/v and gate/up fused in the
checkpoint (split here; the runtime fuses them again in its own way), longrope scaling, and
sliding-window attention on every layer where config.json declares a window (as transformers
runs it; llama.cpp runs GGUF files with full attention, and so does llmrun)."""

from __future__ import annotations

from collections.abc import Iterator

from llmrun.errors import LlmrunError
from llmrun.models.config import ModelConfig
from llmrun.models.gguf_config import GGUFMetadata, common_fields as gguf_fields
from llmrun.models.gguf_names import hf_name
from llmrun.models.hf_config import common_fields, longrope_spec
from llmrun.models.tensors import split_rows

MODEL_TYPES = ("phi3",)
GGUF_ARCHS = ("phi3",)
GGUF_CONTROL_TOKENS: frozenset[str] = frozenset()
CHAT_TEMPLATE = None


def config_from_hf(d: dict) -> ModelConfig:
    rotary = (d.get("rope_parameters") or {}).get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if rotary != 1.0:  # Phi-4-mini
        raise LlmrunError(f"config.json: partial_rotary_factor {rotary} (rope on part of each head) "
                          "is not supported; llmrun runs Phi-3 and Phi-3.5")
    fields = common_fields(d)
    window = d.get("sliding_window")
    if window and int(window) < fields["max_seq_len"]:  # Phi-3.5's 262144 is past its context
        fields.update(sliding_window=int(window), layer_types=("sliding",) * fields["n_layers"])
    return ModelConfig(family="phi3", activation="silu", **fields)


def config_from_gguf(meta: GGUFMetadata) -> ModelConfig:
    fields = gguf_fields(meta)
    long, short = meta.rope_factors.get("rope_factors_long"), meta.rope_factors.get("rope_factors_short")
    if long is not None and short is not None:
        original = int(meta.get("rope.scaling.original_context_length", fields["max_seq_len"]))
        fields["rope"] = longrope_spec(fields["rope"].theta, fields["max_seq_len"] / original, original,
                                       short, long, meta.get("rope.scaling.attn_factor"))
    return ModelConfig(family="phi3", activation="silu", **fields)


def _split_fused(name: str, tensor, cfg: ModelConfig) -> Iterator[tuple[str, object]]:
    """qkv_proj / gate_up_proj (weight, or a bias) -> their parts under the model's names."""
    stem, _, kind = name.rpartition(".")
    if stem.endswith("self_attn.qkv_proj"):
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        parts = dict(zip(("q_proj", "k_proj", "v_proj"), split_rows(tensor, [q, kv, kv])))
    elif stem.endswith("mlp.gate_up_proj"):
        parts = dict(zip(("gate_proj", "up_proj"), split_rows(tensor, [cfg.ffn_dim, cfg.ffn_dim])))
    else:
        yield name, tensor
        return
    prefix = stem.rpartition(".")[0]
    for part, w in parts.items():
        yield f"{prefix}.{part}.{kind}", w


def hf_tensors(name: str, tensor, cfg: ModelConfig) -> Iterator[tuple[str, object]]:
    yield from _split_fused(name, tensor, cfg)


def gguf_tensors(name: str, tensor, cfg: ModelConfig) -> Iterator[tuple[str, object]]:
    # llama.cpp keeps the fused tensors: attn_qkv, and ffn_up holding gate then up
    name = hf_name(name, "phi3", {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj",
                                  "ffn_norm": "post_attention_layernorm"})
    if name is not None:
        yield from _split_fused(name, tensor, cfg)
