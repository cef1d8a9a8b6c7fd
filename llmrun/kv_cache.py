"""The KV cache: owned by the runtime and passed into each forward, never kept by the model.

Laid out in slots, one per sequence: per layer, k and v of (slots, n_kv_heads, length,
head_dim). A forward's row b is a sequence in slot `slots[b]` at positions `input_pos[b]`:
rows at different lengths share one step, and a slot outlives any one call (what prefix
reuse and batched decode build on). A module so that a compiled step can hold its tensors as
buffers by name (llmrun.aot binds them without copies)."""

from __future__ import annotations

import torch
from torch import nn

from llmrun.models.config import ModelConfig


class KVCache(nn.Module):
    def __init__(self, cfg: ModelConfig, slots: int, length: int, dtype: torch.dtype):
        super().__init__()
        self.slots, self.length = slots, length
        shape = (slots, cfg.n_kv_heads, length, cfg.head_dim)
        for i in range(cfg.n_layers):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype), persistent=False)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's k, v: (slots, n_kv_heads, length, head_dim) each."""
        return getattr(self, f"k{i}"), getattr(self, f"v{i}")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def copy_prefix(self, other: "KVCache", n: int) -> None:
        """Every slot's first n positions from `other` (same slots, layers and heads)."""
        for mine, theirs in zip(self.buffers(), other.buffers()):
            mine[:, :, :n] = theirs[:, :, :n]
