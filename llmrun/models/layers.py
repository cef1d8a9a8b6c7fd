"""The transformer every family shares. Module names follow the Hugging Face checkpoints
(model.layers.N.self_attn.q_proj, ...) so safetensors load with no name map; per-family
behaviour comes only from ModelConfig fields.

The model keeps no runtime state: the KV cache (llmrun.runtime.kv_cache, laid out in slots) is the
runtime's and comes into each forward with per-row positions (B, T) and a slot per row, so
prefill and decode of any mix of sequences are the same forward with different arguments."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from llmrun.kernels.attention import cache_attention_available, decode_attention, prefill_attention
from llmrun.models.config import ModelConfig
from llmrun.models.rope import Rope, apply_rope


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


def all_ranks_sum(x: torch.Tensor) -> torch.Tensor:
    """x summed over the tensor-parallel ranks (every process of torch.distributed's group)."""
    from torch.distributed import _functional_collectives as collectives

    return collectives.wait_tensor(collectives.all_reduce(x, "sum", torch.distributed.group.WORLD))


def fuse_into(module: nn.Module, parts: tuple[str, ...], target: str, fuse) -> None:
    """module.<target> = fuse(its <parts>, target), which then go; nothing when fuse returns
    None or the module is fused already."""
    fused = fuse([getattr(module, name) for name in parts], target) if getattr(module, target) is None else None
    if fused is not None:
        setattr(module, target, fused)
        for name in parts:
            delattr(module, name)


@dataclass(frozen=True)
class AttentionSettings:
    """How attention runs: decided for the whole model in one place (Transformer.configure)
    and handed to every layer's forward."""

    kernels: bool = False  # llmrun's cache attention ops (kernels.attention), where available
    bf16_dots: bool = False  # prefill attention may multiply fp32 operands in bf16 (AVX512-BF16)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale, self.softcap = cfg.scale, cfg.attn_softcap
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, q_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.dim, bias=cfg.o_bias)
        self.sum_over_ranks = cfg.tp_size > 1  # this rank holds some of the heads
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_plus_one)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_plus_one)
        self.window = 0  # sliding-window length of this layer (0: attends to every position)
        # Optional single module computing [q | k | v] in one call (see fuse)
        self.qkv_proj: nn.Module | None = None
        self.qkv_splits = (q_dim, kv_dim, kv_dim)

    def fuse(self, fuse) -> None:
        """q/k/v as one module built by `fuse([q, k, v], "qkv_proj")`, unless it returns None."""
        fuse_into(self, ("q_proj", "k_proj", "v_proj"), "qkv_proj", fuse)

    def forward(self, x, cos, sin, mask, input_pos, slots, cache, settings: AttentionSettings):
        # x: (B, T, dim); cos, sin: (B, 1, T, hd); mask: (B, 1, T, S) bool, True where attention
        # is allowed; input_pos: (B, T); slots: (B,) each row's cache slot; cache: this layer's
        # kv_cache.LayerCache (k, v of (slots, Hkv, S, hd)), or None for a forward over this
        # call's tokens alone (S = T)
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
        if cache is not None:
            cache.write(slots, input_pos, k, v)
            k_cache, v_cache = cache
        if cache is not None and settings.kernels and T == 1:  # reads each row's filled positions only
            out = decode_attention(q, k_cache, v_cache, input_pos, slots, self.scale, self.softcap or 0.0,
                                   self.window)
        elif cache is not None and settings.kernels and self.softcap is None:  # per block of queries
            out = prefill_attention(q, k_cache, v_cache, input_pos, slots, self.scale, self.window,
                                    settings.bf16_dots)
        else:
            if cache is not None:  # masked attention over the rows' whole slots
                k, v = k_cache[slots].to(q.dtype), v_cache[slots].to(q.dtype)  # (B, Hkv, S, hd)
            out = self._masked_attention(q, k, v, mask)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        out = self.o_proj(out)
        return all_ranks_sum(out) if self.sum_over_ranks else out

    def _masked_attention(self, q, k, v, mask):
        if self.softcap is None and q.shape[2] > 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                                  enable_gqa=self.n_heads != self.n_kv_heads)
        # Decode (one query) and soft-capping: explicit math, which the compiler fuses; SDPA's
        # CPU kernel costs more in set-up than the work of one query.
        return self._explicit_attention(q, k, v, mask)

    def _explicit_attention(self, q, k, v, mask):
        # q: (B, H, T, hd); k, v: (B, Hkv, S, hd); mask (B, 1, T, S). Query heads are grouped by
        # the kv head they share, so no kv copy is made: (B, Hkv, rep * T, hd).
        B, H, T, hd = q.shape
        rep = H // self.n_kv_heads
        qg = q.reshape(B, self.n_kv_heads, rep * T, hd)
        if T == 1:  # broadcast-multiply-sum: the compiler fuses it into one loop (no bmm call)
            scores = (qg.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1).float() * self.scale
        else:
            scores = (qg @ k.transpose(-1, -2)).float() * self.scale  # (B, Hkv, rep * T, S)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.view(B, self.n_kv_heads, rep, T, -1).masked_fill(~mask[:, :, None], float("-inf"))
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
        self.sum_over_ranks = cfg.tp_size > 1  # this rank holds some of the feed-forward units
        self.gelu = cfg.activation == "gelu_tanh"
        # Optional single module computing [gate | up] in one call (see fuse)
        self.gate_up_proj: nn.Module | None = None

    def fuse(self, fuse) -> None:
        """gate/up as one module built by `fuse([gate, up], "gate_up_proj")`, unless it returns None."""
        fuse_into(self, ("gate_proj", "up_proj"), "gate_up_proj", fuse)

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        gate = gelu_tanh(gate) if self.gelu else F.silu(gate)
        out = self.down_proj(gate * up)
        return all_ranks_sum(out) if self.sum_over_ranks else out


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

    def forward(self, x, cos, sin, mask, input_pos, slots, cache, settings: AttentionSettings):
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, slots, cache, settings)
        if self.sandwich:
            h = x + self.post_attention_layernorm(attn)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """Holds the checkpoint's `model.*` tensors."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # the loader assigns the table: an empty one skips nn.Embedding's initializer, whose
        # normal_ on the meta device imports torch._dynamo (~1 s)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=torch.empty(cfg.vocab_size, cfg.dim))
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_plus_one)


def fuse_projections(model: nn.Module, fuse) -> None:
    """Replace q/k/v and gate/up by one module each, built by `fuse(list of modules, path of
    the fused module)` (path: e.g. model.layers.0.self_attn.qkv_proj; fuse returns None when
    those modules cannot be fused). Layers that read the same input then cost one call: one
    activation pass, one threaded region."""
    for name, module in model.named_modules():
        if isinstance(module, (Attention, MLP)):
            module.fuse(lambda parts, target, prefix=name: fuse(parts, f"{prefix}.{target}"))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # the rope of full and of sliding-window layers
        self.rope = Rope(cfg.rope, cfg.head_dim)
        self.rope_local = Rope(cfg.rope_local or cfg.rope, cfg.head_dim)
        self.attention = AttentionSettings(kernels=cache_attention_available())

    @property
    def compute_dtype(self) -> torch.dtype:
        """The activations' dtype (the norms' weights stay in it whatever the layers hold)."""
        return self.model.norm.weight.dtype

    def configure(self, **settings) -> None:
        """Change how attention runs (AttentionSettings' fields), for the whole model."""
        self.attention = replace(self.attention, **settings)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, cache=None,
                slots: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Float32 logits (B, T, vocab), or (B, 1, vocab) with last_only; see hidden()."""
        x = self.hidden(idx, input_pos, cache, slots)
        return self.head(x[:, -1:] if last_only else x)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., dim) final-norm outputs -> float32 logits (..., vocab)."""
        logits = self.lm_head(hidden).float()
        if self.config.final_softcap is not None:
            logits = torch.tanh(logits / self.config.final_softcap) * self.config.final_softcap
        return logits

    def hidden(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, cache=None,
               slots: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) token ids. With a cache (llmrun.runtime.kv_cache.KVCache): input_pos (B, T), the
        tokens' positions, and slots (B,), the slot each row's sequence lives in (default: row b
        in slot b); the tokens' keys and values are written there. With no cache: a plain
        forward over these tokens alone, at positions 0..T-1. Returns the final-norm outputs
        (B, T, dim)."""
        cfg = self.config
        B, T = idx.shape
        if cache is None:
            input_pos = torch.arange(T, device=idx.device).expand(B, T)
            k_pos = input_pos[0]  # attend over this call's tokens only
        else:
            if slots is None:
                slots = torch.arange(B, device=idx.device)
            k_pos = torch.arange(cache.length, device=idx.device)
        allowed = k_pos <= input_pos[..., None]  # (B, T, S)
        local_allowed = allowed
        if cfg.sliding_window:
            local_allowed = allowed & (input_pos[..., None] - k_pos < cfg.sliding_window)
        allowed, local_allowed = allowed.unsqueeze(1), local_allowed.unsqueeze(1)  # (B, 1, T, S)
        cos, sin = self.rope(input_pos)
        local_cos, local_sin = self.rope_local(input_pos)

        x = self.model.embed_tokens(idx)  # (B, T, dim)
        if cfg.embed_scale != 1.0:
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        for i, layer in enumerate(self.model.layers):
            layer_cache = None if cache is None else cache.layer(i)
            if layer.sliding:
                x = layer(x, local_cos, local_sin, local_allowed, input_pos, slots, layer_cache, self.attention)
            else:
                x = layer(x, cos, sin, allowed, input_pos, slots, layer_cache, self.attention)
        return self.model.norm(x)
