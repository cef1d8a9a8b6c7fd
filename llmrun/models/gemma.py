"""Gemma 1, 2 and 3: deltas over the shared transformer.

Gemma 1: GeGLU (tanh GELU), RMSNorm with (1 + w), embeddings scaled by sqrt(dim), tied head.
Gemma 2: + attention and final logit soft-capping, alternating sliding-window layers,
          post-attention and pre/post feed-forward norms, query_pre_attn_scalar.
Gemma 3: + q/k RMSNorm, local/global layers with their own rope bases."""

from __future__ import annotations

import math

from llmrun.models.config import ModelConfig
from llmrun.models.hf_config import common_fields, layer_types

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
GGUF_ARCHS = ("gemma", "gemma2", "gemma3")
GGUF_PERMUTES_QK = False
# Gemma 3's image placeholders are special tokens in its Hugging Face tokenizer, but converted
# GGUF files type them user-defined (text): they are control tokens here, never printed.
GGUF_CONTROL_TOKENS = frozenset({"<start_of_image>", "<end_of_image>", "<image_soft_token>"})


def _family(model_type: str) -> str:
    return {"gemma": "gemma", "gemma2": "gemma2"}.get(model_type, "gemma3")


def config_from_hf(d: dict) -> ModelConfig:
    if d.get("model_type") == "gemma3" and "text_config" in d:  # multimodal wrapper
        d = {**d["text_config"], "model_type": "gemma3_text"}
    family = _family(d.get("model_type", "gemma"))
    fields = common_fields(d)
    fields["tie_embeddings"] = bool(d.get("tie_word_embeddings", True))
    extra = family_deltas(
        family,
        dim=fields["dim"],
        n_layers=fields["n_layers"],
        query_pre_attn_scalar=d.get("query_pre_attn_scalar"),
        attn_softcap=d.get("attn_logit_softcapping"),
        final_softcap=d.get("final_logit_softcapping"),
        sliding_window=d.get("sliding_window"),
        layer_types=layer_types(d, fields["n_layers"], d.get("sliding_window_pattern")
                                or (2 if family == "gemma2" else 6)),
    )
    return ModelConfig(**fields, **extra)


def family_deltas(family, *, dim, n_layers, query_pre_attn_scalar=None, attn_softcap=None,
                  final_softcap=None, sliding_window=None, layer_types=()) -> dict:
    deltas = dict(family=family, activation="gelu_tanh", norm_plus_one=True,
                  embed_scale=math.sqrt(dim))
    if family == "gemma":
        return deltas
    deltas.update(
        sandwich_norms=True,
        attn_scale=float(query_pre_attn_scalar) ** -0.5 if query_pre_attn_scalar else None,
        attn_softcap=float(attn_softcap) if attn_softcap else None,
        final_softcap=float(final_softcap) if final_softcap else None,
        sliding_window=int(sliding_window) if sliding_window else None,
        layer_types=tuple(layer_types) if sliding_window else ("full",) * n_layers,
        qk_norm=family == "gemma3",
    )
    return deltas
