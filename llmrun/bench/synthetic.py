"""Random weights of real models' true shapes: speed does not depend on the values.

The model is built on the meta device and filled module by module straight into the form the
path runs: bf16/fp32 tensors for the float paths; for the int4 paths random neutral int4
tensors (random uint8 nibbles, small positive scales; offsets for asymmetric groups), the
head in the requested scheme and an int8 embedding, as llmrun.quant.transform.QuantTransform lays a real
model out. So
no full-precision copy of an int4 model ever exists (an 8B int4 model needs ~5 GB, never
the 32 GB of its fp32 form).

Shapes are written as Hugging Face config.json dicts, so the llmrun model (config_from_hf)
and the transformers model (AutoConfig.for_model) are the same architecture.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}

SYNTHETIC: dict[str, dict] = {
    "llama3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                        tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=131072,
                        rope_parameters={**_LLAMA3_ROPE, "factor": 32.0}),
    "llama3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                        tie_word_embeddings=False, rms_norm_eps=1e-5, max_position_embeddings=131072,
                        rope_parameters={**_LLAMA3_ROPE, "factor": 8.0}),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "gemma3-270m": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
                        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                        tie_word_embeddings=True, rms_norm_eps=1e-6, max_position_embeddings=32768,
                        sliding_window=512, query_pre_attn_scalar=256,
                        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         tie_word_embeddings=True, rms_norm_eps=1e-6, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3-4b": dict(model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     tie_word_embeddings=True, rms_norm_eps=1e-6, max_position_embeddings=40960,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # longrope factors of ones: the values change no cost
    "phi3.5-mini": dict(model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                        tie_word_embeddings=False, rms_norm_eps=1e-5, max_position_embeddings=131072,
                        original_max_position_embeddings=4096, sliding_window=262144,
                        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                         "original_max_position_embeddings": 4096,
                                         "short_factor": [1.0] * 48, "long_factor": [1.0] * 48}),
    # for tests: every code path in seconds
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=2048,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def hf_dict(name: str) -> dict:
    from llmrun.errors import LlmrunError

    if name not in SYNTHETIC:
        raise LlmrunError(f"unknown --synthetic {name!r}; choose one of {', '.join(SYNTHETIC)}")
    return dict(SYNTHETIC[name])


def model_config(name: str):
    from llmrun.models import config_from_hf

    return config_from_hf(hf_dict(name))


def param_counts(cfg) -> dict:
    """Element counts: embedding, the linear layers of the blocks, the head (0 when tied), rest."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    per_layer = cfg.dim * (q + 2 * kv) + q * cfg.dim + 3 * cfg.dim * cfg.ffn_dim
    return {"embedding": cfg.vocab_size * cfg.dim, "linear": cfg.n_layers * per_layer,
            "head": 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim}


def estimate_bytes(cfg, form: str) -> int:
    """Weight bytes a path holds: form is float32 | bfloat16 | int4 (with group size ignored)."""
    c = param_counts(cfg)
    if form in ("float32", "bfloat16"):
        size = 4 if form == "float32" else 2
        return size * (c["embedding"] + c["linear"] + c["head"])
    # int4 linears (+ scales, ~6%), int8 embedding, int8 head (a tied head is a second copy)
    # and its int4 copy (a rescored head)
    head = c["head"] or c["embedding"]
    return int(c["linear"] * 0.53) + c["embedding"] + head + int(head * 0.53)


def _uniform(shape, dtype, bound: float, g: torch.Generator) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype).uniform_(-bound, bound, generator=g)


def _random_int4(N: int, K: int, group_size: int, g: torch.Generator):
    """Neutral int4: uint8 [N, ceil(K/2)] nibbles, positive scales [N, n_groups] sized so a
    layer keeps activations O(1) (nibble values have sd ~4.6)."""
    G = 1 if group_size == 0 else -(-K // group_size)
    qweight = torch.randint(0, 256, (N, (K + 1) // 2), dtype=torch.uint8, generator=g)
    scales = torch.empty(N, G).uniform_(0.5, 1.5, generator=g) * (0.22 / math.sqrt(K))
    return qweight, scales


def _random_int8(N: int, K: int, g: torch.Generator):
    qweight = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    scales = torch.empty(N).uniform_(0.5, 1.5, generator=g) * (1.0 / (73 * math.sqrt(K)))
    return qweight, scales


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _packed_head(q8: torch.Tensor, s8: torch.Tensor, scheme: str, group_size: int, g: torch.Generator):
    """The output head in `scheme` (llmrun.quant.schemes) from its random int8 table."""
    from llmrun.kernels import Int4Linear, Int8Linear, RescoredLinear
    from llmrun.quant.transform import RESCORE_GROUP, RESCORE_K

    N, K = q8.shape
    if scheme == "int8":
        return Int8Linear.from_neutral(q8, s8)
    group = RESCORE_GROUP if scheme == "int4-rescored" else group_size
    scan = Int4Linear.from_neutral(*_random_int4(N, K, group, g), group, K)
    if scheme == "int4":
        return scan
    return RescoredLinear(scan, Int8Linear.from_neutral(q8, s8, backend="reference"), RESCORE_K)


def _random_int4_layer(N: int, K: int, group_size: int, kind: str, g: torch.Generator) -> nn.Module:
    """A packed int4 layer of random codes: symmetric (Int4Linear) or, in groups, asymmetric
    (BlockLinear, offsets centring the codes as a symmetric layer's are)."""
    from llmrun.kernels import Int4Linear
    from llmrun.kernels.block_linear import BlockLinear
    from llmrun.kernels.blocks import BlockWeight

    q, s = _random_int4(N, K, group_size, g)
    if kind == "symmetric" or group_size == 0:
        return Int4Linear.from_neutral(q, s, group_size, K)
    if K % 2:
        q[:, -1] = (q[:, -1] & 0xF) | 0x80  # the pad nibble of an odd K is the zero code
    offsets = -s * torch.empty_like(s).uniform_(7.0, 9.0, generator=g)
    return BlockLinear.from_blocks(BlockWeight(q, 4, group_size, s, offsets, K))


def build_llmrun(cfg, dtype: torch.dtype, int4: bool, group_size: int = 0, seed: int = 0, head: str = "int8",
                 int4_kind: str = "asymmetric"):
    """(model, {"load_s", "quantize_s"}): llmrun's Transformer with random weights, the int4
    paths' layers of `int4_kind` (llmrun.quant.schemes.INT4_KINDS) and output head in scheme
    `head`. For int4, quantize_s is the time spent packing the neutral tensors into the
    kernel's layout."""
    from llmrun.models import build_on_meta
    from llmrun.quant.transform import Int8Embedding, TiedEmbedding, tied_table
    from llmrun.runtime.memory import release_free_heap

    start = time.perf_counter()
    pack_s = 0.0
    g = torch.Generator().manual_seed(seed)
    model = build_on_meta(cfg)
    int8_table = None  # the shared int8 copy of a tied embedding / head
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Embedding):
            V, D = module.num_embeddings, module.embedding_dim
            if int4:
                int8_table = _random_int8(V, D, g)
                if not cfg.tie_embeddings:  # tied: the head's table, below
                    _set_child(model, name, Int8Embedding(int8_table[0], int8_table[1], dtype))
            else:
                module.weight = nn.Parameter(_uniform((V, D), dtype, 1.0, g), requires_grad=False)
        elif isinstance(module, nn.Linear):
            N, K = module.out_features, module.in_features
            if name == "lm_head" and cfg.tie_embeddings and not int4:
                continue  # tied below
            if name == "lm_head" and int4:
                q, s = int8_table if cfg.tie_embeddings and int8_table is not None else _random_int8(N, K, g)
                t = time.perf_counter()
                _set_child(model, name, _packed_head(q, s, head, group_size, g))
                pack_s += time.perf_counter() - t
                int8_table = q = s = None  # the packed head is the only copy kept
                continue
            if int4:
                t = time.perf_counter()
                new = _random_int4_layer(N, K, group_size, int4_kind, g)
                if module.bias is not None:
                    new._set_bias(torch.zeros(N))
                pack_s += time.perf_counter() - t
                _set_child(model, name, new)
                release_free_heap()  # packing intermediates
                continue
            module.weight = nn.Parameter(_uniform((N, K), dtype, math.sqrt(3.0 / K), g), requires_grad=False)
            if module.bias is not None:
                module.bias = nn.Parameter(torch.zeros(N, dtype=dtype), requires_grad=False)
        else:
            for leaf, p in list(module._parameters.items()):
                if p is not None and p.is_meta:  # norms: their neutral value
                    fill = torch.zeros if getattr(module, "plus_one", False) else torch.ones
                    module._parameters[leaf] = nn.Parameter(fill(p.shape, dtype=dtype), requires_grad=False)
    if cfg.tie_embeddings and not int4:
        model.lm_head.weight = model.model.embed_tokens.weight
    if cfg.tie_embeddings and int4:  # one int8 table, read by the head and the embedding
        table = tied_table(model.lm_head)
        if table is not None:
            model.model.embed_tokens = TiedEmbedding(table, dtype)
        else:  # an int4 head: the embedding keeps its own int8 table
            model.model.embed_tokens = Int8Embedding(*_random_int8(cfg.vocab_size, cfg.dim, g), dtype)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"synthetic model left parameters unfilled: {leftover[:3]}")
    model.eval()
    total = time.perf_counter() - start
    return model, {"load_s": total - pack_s, "quantize_s": pack_s if int4 else 0.0}


def build_transformers(name: str, dtype: torch.dtype, seed: int = 0):
    """(transformers model, seconds): the same architecture in transformers, random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    start = time.perf_counter()
    d = hf_dict(name)
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    with no_init_weights():  # allocate only: the fill below is the one pass over the weights
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(seed)
    seen = set()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.dim() == 1:
                p.fill_(0.0 if "gemma" in config.model_type else 1.0)  # norms
            else:
                p.uniform_(-math.sqrt(3.0 / p.shape[1]) if "embed" not in pname else -1.0,
                           math.sqrt(3.0 / p.shape[1]) if "embed" not in pname else 1.0, generator=g)
    model.eval()
    return model, time.perf_counter() - start
