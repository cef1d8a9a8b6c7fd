"""One config dataclass for every family. Family modules fill it from a checkpoint's
config.json (`from_hf`) or from GGUF metadata (`llmrun.formats.gguf_file`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmrun.errors import LlmrunError


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embeddings as transformers' rope types define them (modeling_rope_utils)."""

    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3 | yarn | longrope
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position: int = 8192  # llama3, yarn, longrope: the pre-training context
    beta_fast: float = 32.0  # yarn: the ramp between extrapolated and interpolated frequencies
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0  # yarn, longrope: cos and sin are multiplied by it
    freq_factors: tuple[float, ...] | None = None  # divide inv_freq (GGUF rope_freqs, longrope's short factors)
    # longrope: the factors of rows whose positions reach original_max_position
    long_freq_factors: tuple[float, ...] | None = None


@dataclass
class ModelConfig:
    family: str  # llama | gemma | gemma2 | gemma3
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    max_seq_len: int
    norm_eps: float = 1e-5
    rope: RopeSpec = field(default_factory=RopeSpec)
    rope_local: RopeSpec | None = None  # rope of sliding-window layers, when it differs
    tie_embeddings: bool = False
    activation: str = "silu"  # silu | gelu_tanh
    qkv_bias: bool = False  # q, k and v projections have biases
    o_bias: bool = False  # the output projection has a bias
    mlp_bias: bool = False
    # Gemma deltas
    norm_plus_one: bool = False  # RMSNorm multiplies by (1 + w)
    embed_scale: float = 1.0  # embeddings multiplied by this (sqrt(dim) for Gemma)
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sandwich_norms: bool = False  # post-attention, pre/post-feed-forward norms (Gemma 2/3)
    qk_norm: bool = False  # RMSNorm on q and k per head (Gemma 3)
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer: "full" | "sliding"
    # tensor parallel: n_heads, n_kv_heads and ffn_dim are this rank's share of tp_size; the
    # attention and feed-forward outputs are summed over the ranks (llmrun.runtime.tensor_parallel)
    tp_size: int = 1

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "ffn_dim", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)!r} must be a positive integer")
        limits = dict(vocab_size=1 << 22, dim=1 << 16, n_layers=1024, n_heads=1024,
                      head_dim=1024, ffn_dim=1 << 20, max_seq_len=1 << 24)
        for name, limit in limits.items():
            if not problems and getattr(self, name) > limit:
                problems.append(f"{name}={getattr(self, name)} is beyond any real model (> {limit})")
        if not problems and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.activation not in ("silu", "gelu_tanh"):
            problems.append(f"activation {self.activation!r} is not supported (silu, gelu_tanh)")
        if not self.layer_types:
            self.layer_types = ("full",) * self.n_layers
        if len(self.layer_types) != self.n_layers:
            problems.append(f"{len(self.layer_types)} layer types for {self.n_layers} layers")
        if "sliding" in self.layer_types and not self.sliding_window:
            problems.append("sliding-window layers but no sliding_window size")
        if problems:
            raise LlmrunError("invalid model config: " + "; ".join(problems))

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    def rope_for(self, layer: int) -> RopeSpec:
        if self.layer_types[layer] == "sliding" and self.rope_local is not None:
            return self.rope_local
        return self.rope
