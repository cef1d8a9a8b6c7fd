"""Llama 2/3/3.1/3.2 and SmolLM2: the base architecture, no deltas."""

from __future__ import annotations

from llmrun.models.config import ModelConfig
from llmrun.models.hf_config import common_fields

MODEL_TYPES = ("llama", "mistral")
GGUF_ARCHS = ("llama",)
# llama.cpp permutes q/k rows for its interleaved rope; weights from GGUF must be un-permuted.
GGUF_PERMUTES_QK = True
GGUF_CONTROL_TOKENS: frozenset[str] = frozenset()  # user-defined tokens that are control tokens


def config_from_hf(d: dict) -> ModelConfig:
    fields = common_fields(d)
    window = d.get("sliding_window")
    if window:
        fields.update(sliding_window=int(window), layer_types=("sliding",) * fields["n_layers"])
    return ModelConfig(family="llama", activation="silu", **fields)


def gguf_deltas(meta) -> dict:
    return dict(family="llama", activation="silu")
