"""Reading the fields every family shares from a Hugging Face config.json dict. Handles
both the older layout (rope_theta + rope_scaling) and transformers 5's rope_parameters."""

from __future__ import annotations

import math

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


def rope_spec(params: dict | None, default_theta: float, d: dict | None = None) -> RopeSpec:
    """One rope from its parameters (rope_scaling / rope_parameters); `d`, the whole config, for
    the fields yarn and longrope may read from its top level."""
    params, d = params or {}, d or {}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta", default_theta))
    original = params.get("original_max_position_embeddings") or d.get("original_max_position_embeddings")
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
    if rope_type == "yarn":
        return yarn_spec(theta, params.get("factor") or require_int(d, "max_position_embeddings") / original,
                         int(original), params.get("attention_factor"), params.get("mscale"),
                         params.get("mscale_all_dim"), float(params.get("beta_fast") or 32.0),
                         float(params.get("beta_slow") or 1.0), bool(params.get("truncate", True)))
    if rope_type in ("longrope", "su"):
        return longrope_spec(theta, params.get("factor") or require_int(d, "max_position_embeddings") / original,
                             int(original), params["short_factor"], params["long_factor"],
                             params.get("attention_factor"))
    raise LlmrunError(f"rope scaling type {rope_type!r} is not supported (default, linear, llama3, yarn, longrope)")


def yarn_spec(theta: float, factor: float, original: int, attention_factor=None, mscale=None,
              mscale_all_dim=None, beta_fast: float = 32.0, beta_slow: float = 1.0,
              truncate: bool = True) -> RopeSpec:
    """YaRN, its attention factor as transformers infers it when the config gives none."""
    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        attention_factor = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else get_mscale(factor))
    return RopeSpec(theta=theta, rope_type="yarn", factor=float(factor), original_max_position=original,
                    beta_fast=beta_fast, beta_slow=beta_slow, truncate=truncate,
                    attention_factor=float(attention_factor))


def longrope_spec(theta: float, factor: float, original: int, short, long,
                  attention_factor=None) -> RopeSpec:
    """LongRoPE (Phi-3), its attention factor as transformers infers it when none is given."""
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeSpec(theta=theta, rope_type="longrope", factor=float(factor), original_max_position=original,
                    attention_factor=float(attention_factor), freq_factors=tuple(map(float, short)),
                    long_freq_factors=tuple(map(float, long)))


def rope_specs(d: dict) -> tuple[RopeSpec, RopeSpec | None]:
    """(rope of full-attention layers, rope of sliding layers or None)."""
    theta = float(d.get("rope_theta", 10000.0))
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        full = rope_spec(params["full_attention"], theta, d)
        local = rope_spec(params.get("sliding_attention"), theta, d)
        return full, local
    if isinstance(params, dict):
        return rope_spec(params, theta, d), None
    full = rope_spec(d.get("rope_scaling"), theta, d)
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
