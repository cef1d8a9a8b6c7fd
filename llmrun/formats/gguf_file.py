"""GGUF files (read by gguf_reader.py, dequantized by the `gguf` package): config from the
metadata, tensors dequantized to float32 and renamed to the Hugging Face names the model uses."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from llmrun.errors import LlmrunError
from llmrun.formats import gguf_blocks
from llmrun.kernels.blocks import BlockWeight
from llmrun.models import ModelConfig, RopeSpec, family_for_gguf_arch
from llmrun.models.gemma import family_deltas

SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                   "Q4_K", "Q5_K", "Q6_K"}

_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def open_reader(path: Path):
    """The GGUF file at `path` (gguf_reader.GGUFFile: metadata, tensors mapped)."""
    from .gguf_reader import open_gguf

    return open_gguf(path)


def _field(reader, key: str, default=None):
    return reader.metadata.get(key, default)


def read_config(reader) -> ModelConfig:
    try:
        return _read_config(reader)
    except LlmrunError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError) as exc:
        raise LlmrunError(f"GGUF metadata is invalid ({type(exc).__name__}: {exc}); the file is "
                          "corrupt or was not written for a Llama/Gemma model") from None


def _read_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    family = family_for_gguf_arch(arch)
    get = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    n_layers = get("block_count")
    dim = get("embedding_length")
    n_heads = get("attention.head_count")
    n_kv = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer counts: all equal in the architectures we run
        n_kv = n_kv[0]
    if None in (n_layers, dim, n_heads, get("feed_forward_length")):
        raise LlmrunError(f"GGUF metadata for {arch!r} lacks block_count, embedding_length, "
                          "attention.head_count or feed_forward_length")
    head_dim = get("attention.key_length") or dim // n_heads
    vocab = get("vocab_size") or len(reader.metadata.get("tokenizer.ggml.tokens", ()))
    theta = float(get("rope.freq_base", 10000.0))
    scaling = get("rope.scaling.type")
    rope = RopeSpec(theta=theta)
    if scaling == "linear":
        rope = RopeSpec(theta=theta, rope_type="linear", factor=float(get("rope.scaling.factor")))
    freq_factors = _rope_freq_factors(reader)
    if freq_factors is not None:
        rope = RopeSpec(theta=theta, rope_type=rope.rope_type, factor=rope.factor,
                        freq_factors=freq_factors)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    blocks = {int(m.group(1)) for t in reader.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))}
    if blocks != set(range(int(n_layers))):
        raise LlmrunError(f"GGUF metadata says {n_layers} layers but the file holds tensors for "
                          f"{len(blocks)}: the file is corrupt")
    fields = dict(
        vocab_size=int(vocab), dim=int(dim), n_layers=int(n_layers), n_heads=int(n_heads),
        n_kv_heads=int(n_kv), head_dim=int(head_dim), ffn_dim=int(get("feed_forward_length")),
        max_seq_len=int(get("context_length", 4096)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope=rope, tie_embeddings=tied,
    )
    if family.__name__.endswith("gemma"):
        window = get("attention.sliding_window")
        pattern = 2 if arch == "gemma2" else 6
        layer_types = tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(n_layers))
        extra = family_deltas(
            arch, dim=int(dim), n_layers=int(n_layers),
            # llama.cpp: 1/sqrt(head_dim) except Gemma 2/3 27B (1/sqrt(dim/heads)); the files
            # do not say which, so the head_dim rule applies unless dim/heads != head_dim in a 27B
            query_pre_attn_scalar=head_dim,
            attn_softcap=get("attn_logit_softcapping"),
            final_softcap=get("final_logit_softcapping"),
            sliding_window=window, layer_types=layer_types,
        )
        if arch == "gemma3":
            fields["rope_local"] = RopeSpec(theta=10000.0)  # llama.cpp's fixed local base
        return ModelConfig(**fields, **extra)
    return ModelConfig(**fields, **family.gguf_deltas(reader))


def _rope_freq_factors(reader):
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            return tuple(float(v) for v in np.asarray(t.data, dtype=np.float32).reshape(-1))
    return None


def hf_name(gguf_name: str, family_name: str) -> str | None:
    """GGUF tensor name -> the model's name, or None for tensors the model does not hold."""
    if gguf_name == "rope_freqs.weight":
        return None
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m:
        layer, part, kind = m.groups()
        if part == "ffn_norm":
            mapped = "post_attention_layernorm" if family_name == "llama" else "pre_feedforward_layernorm"
        else:
            mapped = _BLOCK_NAMES.get(part)
        if mapped is None:
            raise LlmrunError(f"GGUF tensor {gguf_name!r} is not part of a {family_name} model")
        return f"model.layers.{layer}.{mapped}.{kind}"
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    raise LlmrunError(f"GGUF tensor {gguf_name!r} is not part of a {family_name} model")


def _unpermute_qk(w: torch.Tensor | BlockWeight, n_heads: int) -> torch.Tensor | BlockWeight:
    """Undo llama.cpp's convert permutation (HF rotate-half rows -> interleaved pairs)."""
    rows = w.shape[0]
    order = torch.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).transpose(1, 2).reshape(-1)
    return w.permute_rows(order) if isinstance(w, BlockWeight) else w[order]


def dequantize(t) -> torch.Tensor:
    from gguf import quants

    qtype = t.tensor_type.name
    if qtype not in SUPPORTED_TYPES:
        raise LlmrunError(f"GGUF tensor {t.name!r} has quantization type {qtype}, which llmrun "
                          f"cannot read (supported: {', '.join(sorted(SUPPORTED_TYPES))})")
    shape = [int(d) for d in reversed(t.shape.tolist())]
    data = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    if not data.flags.writeable:  # F32 tensors are views of the read-only memory map
        data = data.copy()
    return torch.from_numpy(np.ascontiguousarray(data).reshape(shape))


def read_tensor(t, keep_blocks: bool) -> torch.Tensor | BlockWeight:
    """A GGUF tensor as float32, or (keep_blocks, a 2-D tensor of a block format llmrun runs as
    shipped) as its exact codes and scales."""
    shape = [int(d) for d in reversed(t.shape.tolist())]
    if keep_blocks and len(shape) == 2 and t.tensor_type.name in gguf_blocks.SHIPPED_TYPES:
        return gguf_blocks.decode(t.data, t.tensor_type.name, (shape[0], shape[1]))
    return dequantize(t)


def shipped_types(reader) -> list[str]:
    """The block formats of the file's 2-D tensors that run as shipped, most bytes first."""
    size: dict[str, int] = {}
    for t in reader.tensors:
        if len(t.shape) == 2 and t.tensor_type.name in gguf_blocks.SHIPPED_TYPES:
            size[t.tensor_type.name] = size.get(t.tensor_type.name, 0) + int(t.n_bytes)
    return sorted(size, key=size.get, reverse=True)


def tensor_stream(reader, cfg: ModelConfig, path: Path,
                  keep_blocks: bool = False) -> Iterator[tuple[str, torch.Tensor | BlockWeight]]:
    family = family_for_gguf_arch(_field(reader, "general.architecture"))
    norm_shift = 1.0 if cfg.norm_plus_one else 0.0  # llama.cpp stores Gemma's (1 + w)
    for t in reader.tensors:
        name = hf_name(t.name, cfg.family if cfg.family == "llama" else "gemma")
        if name is None:
            continue
        try:
            w = read_tensor(t, keep_blocks)
        except LlmrunError:
            raise
        except Exception as exc:  # numpy/gguf raise many types on malformed data
            raise LlmrunError(f"{path}: tensor {t.name!r} cannot be read ({exc}); the file is "
                              "truncated or corrupt") from None
        if family.GGUF_PERMUTES_QK and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.n_heads if "q_proj" in name else cfg.n_kv_heads
            w = _unpermute_qk(w, heads)
        if norm_shift and name.endswith("norm.weight"):
            w = w - norm_shift
        yield name, w
