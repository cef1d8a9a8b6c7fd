"""Reading the fields every family shares from GGUF metadata (llama.cpp's key names: the
architecture's keys are prefixed with its `general.architecture`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from llmrun.errors import LlmrunError
from llmrun.models.config import RopeSpec
from llmrun.models.hf_config import yarn_spec


@dataclass(frozen=True)
class GGUFMetadata:
    """What a family reads of a GGUF file to make its config."""

    metadata: dict
    tensor_names: Sequence[str]
    # the file's rope factor tensors by stem (rope_freqs, rope_factors_long, ...), as floats
    rope_factors: dict[str, tuple[float, ...]]

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture"))

    def get(self, key: str, default=None):
        """The architecture's `<arch>.<key>`."""
        return self.metadata.get(f"{self.arch}.{key}", default)


def common_fields(meta: GGUFMetadata) -> dict:
    """ModelConfig fields every family reads alike."""
    get = meta.get
    n_layers = get("block_count")
    dim = get("embedding_length")
    n_heads = get("attention.head_count")
    n_kv = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer counts: all equal in the architectures we run
        n_kv = n_kv[0]
    if None in (n_layers, dim, n_heads, get("feed_forward_length")):
        raise LlmrunError(f"GGUF metadata for {meta.arch!r} lacks block_count, embedding_length, "
                          "attention.head_count or feed_forward_length")
    head_dim = get("attention.key_length") or dim // n_heads
    rotary = get("rope.dimension_count")
    if rotary is not None and int(rotary) != int(head_dim):
        raise LlmrunError(f"GGUF metadata: rope covers {rotary} of each head's {head_dim} dimensions "
                          "(partial rotary embeddings), which llmrun does not run")
    vocab = get("vocab_size") or len(meta.metadata.get("tokenizer.ggml.tokens", ()))
    blocks = {int(m.group(1)) for name in meta.tensor_names if (m := re.match(r"blk\.(\d+)\.", name))}
    if blocks != set(range(int(n_layers))):
        raise LlmrunError(f"GGUF metadata says {n_layers} layers but the file holds tensors for "
                          f"{len(blocks)}: the file is corrupt")
    return dict(
        vocab_size=int(vocab), dim=int(dim), n_layers=int(n_layers), n_heads=int(n_heads),
        n_kv_heads=int(n_kv), head_dim=int(head_dim), ffn_dim=int(get("feed_forward_length")),
        max_seq_len=int(get("context_length", 4096)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope=rope_spec(meta), tie_embeddings="output.weight" not in meta.tensor_names,
    )


def rope_spec(meta: GGUFMetadata) -> RopeSpec:
    """The rope of the file's full-attention layers: base, linear or YaRN scaling, freq factors."""
    theta = float(meta.get("rope.freq_base", 10000.0))
    scaling = meta.get("rope.scaling.type")
    if scaling in (None, "none"):
        spec = RopeSpec(theta=theta)
    elif scaling == "linear":
        spec = RopeSpec(theta=theta, rope_type="linear", factor=float(meta.get("rope.scaling.factor")))
    elif scaling == "yarn":
        spec = yarn_spec(theta, float(meta.get("rope.scaling.factor")),
                         int(meta.get("rope.scaling.original_context_length")),
                         beta_fast=float(meta.get("rope.scaling.yarn_beta_fast", 32.0)),
                         beta_slow=float(meta.get("rope.scaling.yarn_beta_slow", 1.0)))
    else:
        raise LlmrunError(f"GGUF rope scaling {scaling!r} is not supported (none, linear, yarn)")
    freqs = meta.rope_factors.get("rope_freqs")
    return spec if freqs is None else replace(spec, freq_factors=freqs)
