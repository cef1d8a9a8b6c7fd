"""Gemma 1, 2 and 3: deltas over the shared transformer.

Gemma 1: GeGLU (tanh GELU), RMSNorm with (1 + w), embeddings scaled by sqrt(dim), tied head.
Gemma 2: + attention and final logit soft-capping, alternating sliding-window layers,
          post-attention and pre/post feed-forward norms, query_pre_attn_scalar.
Gemma 3: + q/k RMSNorm, local/global layers with their own rope bases."""

from __future__ import annotations

import math
from collections.abc import Iterator

from llmrun.models.config import ModelConfig, RopeSpec
from llmrun.models.gguf_config import GGUFMetadata, common_fields as gguf_fields
from llmrun.models.gguf_names import hf_name
from llmrun.models.hf_config import common_fields, layer_types

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text", "gemma3")
GGUF_ARCHS = ("gemma", "gemma2", "gemma3")
# Gemma 3's image placeholders are special tokens in its Hugging Face tokenizer, but converted
# GGUF files type them user-defined (text): they are control tokens here, never printed.
GGUF_CONTROL_TOKENS = frozenset({"<start_of_image>", "<end_of_image>", "<image_soft_token>"})

# Gemma 3's template (google/gemma-3-*-it tokenizer_config.json), for GGUF conversions of Gemma,
# which often carry no `tokenizer.chat_template` (the shipped Gemma 3 270M file has none):
# llama.cpp then falls back to its built-in Gemma format, and so do we. A system message is
# folded into the first user turn, as Gemma has no system role.
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)


def _family(model_type: str) -> str:
    return {"gemma": "gemma", "gemma2": "gemma2"}.get(model_type, "gemma3")


def config_from_hf(d: dict) -> ModelConfig:
    if d.get("model_type") == "gemma3" and "text_config" in d:  # multimodal wrapper
        d = {**d["text_config"], "model_type": "gemma3_text"}
    family = _family(d.get("model_type", "gemma"))
    fields = common_fields(d)
    fields["tie_embeddings"] = bool(d.get("tie_word_embeddings", True))
    extra = _deltas(
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


def config_from_gguf(meta: GGUFMetadata) -> ModelConfig:
    fields = gguf_fields(meta)
    arch, n_layers = meta.arch, fields["n_layers"]
    # per layer (True: sliding) or every pattern-th layer full; llama.cpp's defaults without the key
    pattern = meta.get("attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
    if isinstance(pattern, list):
        types = tuple("sliding" if sliding else "full" for sliding in pattern)
    else:
        types = tuple("full" if (i + 1) % int(pattern) == 0 else "sliding" for i in range(n_layers))
    extra = _deltas(
        arch, dim=fields["dim"], n_layers=n_layers,
        # llama.cpp: 1/sqrt(head_dim) except Gemma 2/3 27B (1/sqrt(dim/heads)); the files do not
        # say which, so the head_dim rule applies unless dim/heads != head_dim in a 27B
        query_pre_attn_scalar=fields["head_dim"],
        attn_softcap=meta.get("attn_logit_softcapping"),
        final_softcap=meta.get("final_logit_softcapping"),
        sliding_window=meta.get("attention.sliding_window"),
        layer_types=types,
    )
    if arch == "gemma3":  # sliding layers' rope: no scaling, its own base (llama.cpp's default)
        fields["rope_local"] = RopeSpec(theta=float(meta.get("rope.freq_base_swa", 10000.0)))
    return ModelConfig(**fields, **extra)


def _deltas(family, *, dim, n_layers, query_pre_attn_scalar=None, attn_softcap=None,
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


# Gemma 3 checkpoints with a vision tower (gemma-3-4b and up) nest the language model
_WRAPPER_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                     "language_model.lm_head.": "lm_head."}
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                    "model.multi_modal_projector.")


def hf_tensors(name: str, tensor, cfg: ModelConfig) -> Iterator[tuple[str, object]]:
    if name.startswith(_VISION_PREFIXES):
        return
    for prefix, replacement in _WRAPPER_PREFIXES.items():
        if name.startswith(prefix):
            name = replacement + name[len(prefix):]
            break
    yield name, tensor


def gguf_tensors(name: str, tensor, cfg: ModelConfig) -> Iterator[tuple[str, object]]:
    own = {"ffn_norm": "pre_feedforward_layernorm" if cfg.sandwich_norms else "post_attention_layernorm",
           "post_attention_norm": "post_attention_layernorm",
           "post_ffw_norm": "post_feedforward_layernorm"}
    name = hf_name(name, "gemma", own)
    if name is None:
        return
    if name.endswith("norm.weight"):  # llama.cpp's converter stores the (1 + w) Gemma multiplies by
        tensor = tensor - 1.0
    yield name, tensor
