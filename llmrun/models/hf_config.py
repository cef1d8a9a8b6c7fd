"""Reading the fields every family shares from a Hugging Face config.json dict. Handles
both the older layout (rope_theta + rope_scaling) and transformers 5's rope_parameters."""

from __future__ import annotations

from llmrun.errors import LlmrunError
from llmrun.models.config import RopeSpec


def require(d: dict, *keys: str):
    for key in keys:
        if d.get(key) is not None:
            return d[key]
    raise LlmrunError(f"config.json has no {' / '.join(keys)}: the checkpoint is incomplete")


def require_int(d: dict, *keys: str) -> int:
    value = require(d, *keys)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise LlmrunError(f"config.json: {keys[0]} = {value!r} is not an integer")
    return int(value)


def rope_spec(params: dict | None, default_theta: float) -> RopeSpec:
    params = params or {}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta", default_theta))
    if rope_type == "default":
        return RopeSpec(theta=theta)
    if rope_type == "linear":
        return RopeSpec(theta=theta, rope_type="linear", factor=float(params["factor"]))
    if rope_type == "llama3":
        return RopeSpec(
            theta=theta,
            rope_type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params["original_max_position_embeddings"]),
        )
    raise LlmrunError(f"rope scaling type {rope_type!r} is not supported (default, linear, llama3)")


def rope_specs(d: dict) -> tuple[RopeSpec, RopeSpec | None]:
    """(rope of full-attention layers, rope of sliding layers or None)."""
    theta = float(d.get("rope_theta", 10000.0))
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        full = rope_spec(params["full_attention"], theta)
        local = rope_spec(params.get("sliding_attention"), theta)
        return full, local
    if isinstance(params, dict):
        return rope_spec(params, theta), None
    full = rope_spec(d.get("rope_scaling"), theta)
    local_theta = d.get("rope_local_base_freq")
    return full, (RopeSpec(theta=float(local_theta)) if local_theta else None)


def common_fields(d: dict) -> dict:
    n_heads = require_int(d, "num_attention_heads")
    dim = require_int(d, "hidden_size")
    head_dim = d.get("head_dim")
    if not head_dim:
        if not n_heads or dim % n_heads:
            raise LlmrunError(f"config.json: hidden_size {dim} is not a multiple of "
                              f"num_attention_heads {n_heads}")
        head_dim = dim // n_heads
    rope, rope_local = rope_specs(d)
    return dict(
        vocab_size=require_int(d, "vocab_size"),
        dim=dim,
        n_layers=require_int(d, "num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
        head_dim=int(head_dim),
        ffn_dim=require_int(d, "intermediate_size"),
        max_seq_len=int(d.get("max_position_embeddings") or 4096),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope=rope,
        rope_local=rope_local,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        mlp_bias=bool(d.get("mlp_bias", False)),
    )


def layer_types(d: dict, n_layers: int, pattern: int | None) -> tuple[str, ...]:
    """Per-layer "full"/"sliding" from config.layer_types, or every `pattern`-th layer full."""
    names = d.get("layer_types")
    if names:
        return tuple("sliding" if t == "sliding_attention" else "full" for t in names)
    if pattern:
        return tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(n_layers))
    return ("full",) * n_layers
