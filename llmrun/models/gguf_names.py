"""GGUF tensor names (llama.cpp's `blk.N.attn_q.weight`, ...) -> the model's Hugging Face names,
for the tensors every family names alike; families map the rest."""

from __future__ import annotations

import re

from llmrun.errors import LlmrunError

BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name: str, family: str, block_names: dict[str, str]) -> str | None:
    """GGUF tensor name -> the model's name, with the family's `block_names` (GGUF part ->
    module path in a layer) beside the shared ones; None for a tensor the model does not hold."""
    if gguf_name.startswith("rope_"):  # rope factors: read into the config (gguf_config)
        return None
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m:
        layer, part, kind = m.groups()
        mapped = block_names.get(part) or BLOCK_NAMES.get(part)
        if mapped is not None:
            return f"model.layers.{layer}.{mapped}.{kind}"
    else:
        stem, _, kind = gguf_name.rpartition(".")
        if stem in TOP_NAMES:
            return f"{TOP_NAMES[stem]}.{kind}"
    raise LlmrunError(f"GGUF tensor {gguf_name!r} is not part of a {family} model")
