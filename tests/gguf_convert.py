"""A transformers model written as llama.cpp's converter (convert_hf_to_gguf.py) writes it:
gguf's own tensor name map, the family's metadata keys and llama.cpp's tensor conventions
(Llama's q/k rows permuted for its interleaved rope, Gemma's norms stored as 1 + w, Phi-3's
longrope factors as tensors). Tensors in F32, or in a block format for the 2-D weights."""

from __future__ import annotations

import math

import numpy as np
import torch


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # convert_hf_to_gguf.LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_params(cfg) -> dict:
    params = getattr(cfg, "rope_parameters", None) or {}
    return params.get("full_attention", params) if isinstance(params, dict) else {}


def write_gguf(model, path, arch: str, block_type: str | None = None) -> None:
    """`model`: a transformers causal LM; arch: the GGUF architecture (llama, gemma2, gemma3,
    qwen2, qwen3, phi3); block_type: e.g. "Q8_0" for the 2-D weights (F32 when None)."""
    import gguf

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    rope = _rope_params(cfg)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
    if arch == "gemma3":
        w.add_rope_freq_base_swa(float(cfg.rope_parameters["sliding_attention"]["rope_theta"]))
        if getattr(cfg, "attn_logit_softcapping", None):
            w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        if getattr(cfg, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    extra: dict[str, np.ndarray] = {}
    if arch == "phi3":
        if cfg.sliding_window:
            w.add_sliding_window(cfg.sliding_window)
        if rope.get("rope_type") == "longrope":
            original = int(rope["original_max_position_embeddings"])
            scale = cfg.max_position_embeddings / original
            w.add_rope_scaling_orig_ctx_len(original)
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
            extra["rope_factors_long.weight"] = np.asarray(rope["long_factor"], dtype=np.float32)
            extra["rope_factors_short.weight"] = np.asarray(rope["short_factor"], dtype=np.float32)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    tied = cfg.tie_word_embeddings
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, name
        t = t.detach().float()
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = _permute(t, cfg.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            t = _permute(t, cfg.num_key_value_heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            t = t + 1
        data = t.numpy()
        if block_type and data.ndim == 2:
            qtype = gguf.GGMLQuantizationType[block_type]
            w.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, data)
    for gname, data in extra.items():
        w.add_tensor(gname, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
