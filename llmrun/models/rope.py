"""Rotary position embeddings, computed as transformers computes them (modeling_rope_utils),
in the rotate-half layout of Hugging Face checkpoints."""

from __future__ import annotations

import math

import torch
from torch import nn

from llmrun.models.config import RopeSpec


def _base_inv_freq(spec: RopeSpec, head_dim: int) -> torch.Tensor:
    # (head_dim/2,) on the CPU, whatever the default device (the model is built on meta)
    return 1.0 / (spec.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))


def _llama3(inv_freq: torch.Tensor, spec: RopeSpec) -> torch.Tensor:
    low_wavelen = spec.original_max_position / spec.low_freq_factor
    high_wavelen = spec.original_max_position / spec.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / spec.factor, inv_freq)
    smooth = (spec.original_max_position / wavelen - spec.low_freq_factor) / (
        spec.high_freq_factor - spec.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(spec: RopeSpec, head_dim: int) -> torch.Tensor:
    """Extrapolated frequencies for the dimensions that turn many times over the pre-training
    context, interpolated (divided by factor) for those that turn less, a linear ramp between."""
    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(spec.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(spec.theta))

    low, high = correction_dim(spec.beta_fast), correction_dim(spec.beta_slow)
    if spec.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    pos_freqs = spec.theta ** (torch.arange(0, head_dim, 2, device="cpu").to(torch.float) / head_dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (spec.factor * pos_freqs)
    extrapolation_share = 1 - ramp
    return interpolated * (1 - extrapolation_share) + extrapolated * extrapolation_share


def rope_inv_freq(spec: RopeSpec, head_dim: int, factors: tuple[float, ...] | None = None) -> torch.Tensor:
    """(head_dim/2,) inverse frequencies; `factors` divide them (default: spec.freq_factors)."""
    if spec.rope_type == "yarn":
        inv_freq = _yarn(spec, head_dim)
    else:
        inv_freq = _base_inv_freq(spec, head_dim)
    if spec.rope_type == "linear":
        inv_freq = inv_freq / spec.factor
    elif spec.rope_type == "llama3":
        inv_freq = _llama3(inv_freq, spec)
    factors = spec.freq_factors if factors is None else factors
    if factors is not None:
        inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32, device="cpu")
    return inv_freq


class Rope(nn.Module):
    """cos and sin of one rope at each row's positions."""

    def __init__(self, spec: RopeSpec, head_dim: int):
        super().__init__()
        self.attention_factor = spec.attention_factor
        # real tensors even when the model is built on meta, as the loader does
        self.register_buffer("inv_freq", rope_inv_freq(spec, head_dim), persistent=False)
        self.long_from = None  # longrope: rows with a position at or past this use long_inv_freq
        if spec.long_freq_factors is not None:
            self.long_from = spec.original_max_position
            self.register_buffer("long_inv_freq", rope_inv_freq(spec, head_dim, spec.long_freq_factors),
                                 persistent=False)

    def forward(self, input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: (B, 1, T, head_dim) at positions input_pos (B, T), halves repeated; the
        angles are float32 products, as transformers computes them."""
        pos = input_pos[..., None].float()  # (B, T, 1)
        freqs = pos * self.inv_freq  # (B, T, head_dim/2)
        if self.long_from is not None:  # transformers switches on the call's last position
            long = input_pos.amax(-1, keepdim=True)[..., None] >= self.long_from  # (B, 1, 1)
            freqs = torch.where(long, pos * self.long_inv_freq, freqs)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.unsqueeze(1), sin.unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, head_dim); cos/sin: (B, 1, T, head_dim)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
