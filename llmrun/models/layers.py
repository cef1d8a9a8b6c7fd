"""The transformer every family shares. Module names follow the Hugging Face checkpoints
(model.layers.N.self_attn.q_proj, ...) so safetensors load with no name map; per-family
behaviour comes only from ModelConfig fields.

gpt-fast shape: static KV cache buffers written by index, positions passed in explicitly,
so prefill and decode are the same forward with different (idx, input_pos)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmrun.kernels.attention import cache_attention_available, decode_attention, prefill_attention
from llmrun.models.config import ModelConfig, RopeSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, plus_one: bool):
        super().__init__()
        self.eps = eps
        self.plus_one = plus_one  # Gemma stores w and multiplies by (1 + w)
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(spec: RopeSpec, head_dim: int) -> torch.Tensor:
    """(head_dim/2,) inverse frequencies, computed as transformers computes them."""
    inv_freq = 1.0 / (spec.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if spec.rope_type == "linear":
        inv_freq = inv_freq / spec.factor
    elif spec.rope_type == "llama3":
        low_wavelen = spec.original_max_position / spec.low_freq_factor
        high_wavelen = spec.original_max_position / spec.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / spec.factor, inv_freq)
        smooth = (spec.original_max_position / wavelen - spec.low_freq_factor) / (
            spec.high_freq_factor - spec.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    if spec.freq_factors is not None:
        inv_freq = inv_freq / torch.tensor(spec.freq_factors, dtype=torch.float32)
    return inv_freq


def rope_tables(spec: RopeSpec, head_dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (length, head_dim), halves repeated (rotate-half layout)."""
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), rope_inv_freq(spec, head_dim))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, head_dim); cos/sin: (T, head_dim)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache(nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, length: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch, n_kv_heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # input_pos: (T,); k, v: (B, n_kv, T, head_dim) -> whole caches (B, n_kv, S, head_dim)
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale, self.softcap = cfg.scale, cfg.attn_softcap
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, q_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.dim, kv_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.dim, kv_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_dim, cfg.dim, bias=cfg.attention_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_plus_one)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_plus_one)
        self.kv_cache: KVCache | None = None
        self.window = 0  # sliding-window length of this layer (0: attends to every position)
        self.cache_kernels = False  # attention through kernels.{decode,prefill}_attention (set with the cache)
        self.bf16_dots = False  # prefill attention may multiply in bf16 (use_bf16_attention_products)
        # Optional single module computing [q | k | v] in one call (see fuse_projections)
        self.qkv_proj: nn.Module | None = None
        self.qkv_splits = (q_dim, kv_dim, kv_dim)

    def forward(self, x, cos, sin, mask, input_pos, use_cache: bool):
        # x: (B, T, dim); mask: (T, S) bool, True where attention is allowed
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.qkv_splits, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if use_cache:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, Hkv, S, hd)
        if use_cache and T == 1 and self.cache_kernels:  # reads the filled cache positions only
            out = decode_attention(q, k, v, input_pos, self.scale, self.softcap or 0.0, self.window)
        elif use_cache and self.softcap is None and self.cache_kernels:  # the same, per block of queries
            out = prefill_attention(q, k, v, input_pos, self.scale, self.window, self.bf16_dots)
        elif self.softcap is None and T > 1:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                                 enable_gqa=self.n_heads != self.n_kv_heads)
        else:
            # Decode (one query) and soft-capping: explicit math, which the compiler fuses;
            # SDPA's CPU kernel costs more in set-up than the work of one query.
            out = self._explicit_attention(q, k, v, mask)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(out)

    def _explicit_attention(self, q, k, v, mask):
        # q: (B, H, T, hd); k, v: (B, Hkv, S, hd). Query heads are grouped by the kv head they
        # share, so no kv copy is made: (B, Hkv, rep * T, hd).
        B, H, T, hd = q.shape
        rep = H // self.n_kv_heads
        qg = q.reshape(B, self.n_kv_heads, rep * T, hd)
        if T == 1:  # broadcast-multiply-sum: the compiler fuses it into one loop (no bmm call)
            scores = (qg.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1).float() * self.scale
        else:
            scores = (qg @ k.transpose(-1, -2)).float() * self.scale  # (B, Hkv, rep * T, S)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.view(B, self.n_kv_heads, rep, T, -1).masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1).to(v.dtype).view(B, self.n_kv_heads, rep * T, -1)
        if T == 1:
            return (probs.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2).view(B, H, T, hd)
        return (probs @ v).view(B, H, T, hd)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation. Compiled, as x * sigmoid(2u) (the same function: 0.5 * (1 +
    tanh(u)) = sigmoid(2u), u = sqrt(2/pi) * (x + 0.044715 x^3)): inductor's tanh costs 3x its
    sigmoid (measured on Gemma 3 270M's (512, 2048) gate: 1.02 -> 0.33 ms, 4% of a pp512
    prefill; outputs within 8e-6). Eager keeps torch's single fused op."""
    if not torch.compiler.is_compiling():
        return F.gelu(x, approximate="tanh")
    return x * torch.sigmoid(x * (1.5957691216057308 + 0.0713548162726009 * x * x))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)
        self.gelu = cfg.activation == "gelu_tanh"
        # Optional single module computing [gate | up] in one call (see fuse_projections)
        self.gate_up_proj: nn.Module | None = None

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        gate = gelu_tanh(gate) if self.gelu else F.silu(gate)
        return self.down_proj(gate * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.sliding = cfg.layer_types[layer] == "sliding"
        self.sandwich = cfg.sandwich_norms
        norm = lambda: RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_plus_one)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg)
        self.self_attn.window = (cfg.sliding_window or 0) if self.sliding else 0
        self.post_attention_layernorm = norm()
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, input_pos, use_cache: bool):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, use_cache)
        if self.sandwich:
            h = x + self.post_attention_layernorm(attn)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """Holds the checkpoint's `model.*` tensors."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_plus_one)


def fuse_projections(model: nn.Module, fuse) -> None:
    """Replace q/k/v and gate/up by one module each, built by `fuse(list of modules)` (which
    returns None when those modules cannot be fused). Layers that read the same input then
    cost one call: one activation pass, one threaded region."""
    for module in model.modules():
        if isinstance(module, Attention) and module.qkv_proj is None:
            fused = fuse([module.q_proj, module.k_proj, module.v_proj])
            if fused is not None:
                module.qkv_proj = fused
                del module.q_proj, module.k_proj, module.v_proj
        elif isinstance(module, MLP) and module.gate_up_proj is None:
            fused = fuse([module.gate_proj, module.up_proj])
            if fused is not None:
                module.gate_up_proj = fused
                del module.gate_proj, module.up_proj


def use_bf16_attention_products(model: nn.Module, on: bool = True) -> None:
    """Let the prefill attention kernel multiply fp32 q, k, p and v in bf16 (fp32 sums) where the
    CPU has AVX512-BF16: what a model whose linear layers already multiply int8 activations can
    afford (see kernels/csrc/prefill_bf16.inc for the cost and the error)."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.bf16_dots = on


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.cache_len = 0

    def setup_caches(self, length: int, batch: int = 1, dtype: torch.dtype | None = None) -> None:
        """Allocate KV caches and rope tables for `length` positions."""
        cfg = self.config
        dtype = dtype or self.model.norm.weight.dtype
        self.cache_len = length
        cache_kernels = cache_attention_available()
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(batch, cfg.n_kv_heads, length, cfg.head_dim, dtype)
            layer.self_attn.cache_kernels = cache_kernels
        self._set_rope(length)

    def drop_caches(self) -> None:
        self.cache_len = 0
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    def _set_rope(self, length: int) -> None:
        cfg = self.config
        cos, sin = rope_tables(cfg.rope, cfg.head_dim, length)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        local = cfg.rope_local or cfg.rope
        cos, sin = rope_tables(local, cfg.head_dim, length)
        self.register_buffer("rope_local_cos", cos, persistent=False)
        self.register_buffer("rope_local_sin", sin, persistent=False)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Float32 logits (B, T, vocab), or (B, 1, vocab) with last_only; see hidden()."""
        x = self.hidden(idx, input_pos)
        return self.head(x[:, -1:] if last_only else x)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., dim) final-norm outputs -> float32 logits (..., vocab)."""
        logits = self.lm_head(hidden).float()
        if self.config.final_softcap is not None:
            logits = torch.tanh(logits / self.config.final_softcap) * self.config.final_softcap
        return logits

    def hidden(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) token ids; input_pos: (T,) their positions in the KV cache (see
        setup_caches). With input_pos None this is a plain full-sequence forward that leaves
        any cache untouched. Returns the final-norm outputs (B, T, dim)."""
        cfg = self.config
        T = idx.shape[1]
        use_cache = input_pos is not None
        if not use_cache:
            input_pos = torch.arange(T, device=idx.device)
            if getattr(self, "rope_cos", None) is None or self.rope_cos.shape[0] < T:
                self._set_rope(T)
            k_pos = input_pos  # attend over this call's tokens only
        else:
            k_pos = torch.arange(self.cache_len, device=idx.device)
        allowed = k_pos[None, :] <= input_pos[:, None]  # (T, S)
        local_allowed = allowed
        if cfg.sliding_window:
            local_allowed = allowed & (input_pos[:, None] - k_pos[None, :] < cfg.sliding_window)
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        local_cos, local_sin = self.rope_local_cos[input_pos], self.rope_local_sin[input_pos]

        x = self.model.embed_tokens(idx)  # (B, T, dim)
        if cfg.embed_scale != 1.0:
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        for layer in self.model.layers:
            if layer.sliding:
                x = layer(x, local_cos, local_sin, local_allowed, input_pos, use_cache)
            else:
                x = layer(x, cos, sin, allowed, input_pos, use_cache)
        return self.model.norm(x)
