"""The KV cache: owned by the runtime and passed into each forward, never kept by the model.

Laid out in slots, one per sequence: per layer, k and v of (slots, n_kv_heads, length,
head_dim). A forward's row b is a sequence in slot `slots[b]` at positions `input_pos[b]`:
rows at different lengths share one step, and a slot outlives any one call (what prefix
reuse and batched decode build on). A module so that a compiled step can hold its tensors as
buffers by name (llmrun.runtime.aot binds them without copies).

Each tensor lies in its own anonymous memory map, whose pages the OS hands out zeroed when
first written: a cache of 8 slots x 2048 positions takes memory for the positions its
sequences reach, not for all of them (the attention ops read only filled positions; a read of
a page never written maps the shared zero page)."""

from __future__ import annotations

import math
import mmap
from typing import NamedTuple

import torch
from torch import nn

from llmrun.errors import LlmrunError
from llmrun.models.config import ModelConfig

# What a cache may hold beside a model's compute dtype: its own (auto), fp32, or bf16 (half the
# memory and half the bytes a decode step reads of it; the attention ops widen it to fp32)
KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def kv_dtype(name: str, compute: torch.dtype) -> torch.dtype:
    """The cache dtype `name` ("auto" or a KV_DTYPES key) names beside `compute`."""
    if name == "auto":
        return compute
    if name not in KV_DTYPES:
        raise LlmrunError(f"KV cache dtype {name!r} is not one of auto, {', '.join(KV_DTYPES)}")
    dtype = KV_DTYPES[name]
    if compute == torch.bfloat16 and dtype == torch.float32:
        raise LlmrunError("a float32 KV cache needs float32 activations: the model runs in bfloat16")
    return dtype


def _zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor in its own anonymous map (the tensor keeps the map alive). Private: a page
    never written reads as the shared zero page (a shared map would allocate it)."""
    count = math.prod(shape)
    pages = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE)
    return torch.frombuffer(pages, dtype=dtype, count=count).view(shape)


class LayerCache(NamedTuple):
    """One layer's k and v, (slots, n_kv_heads, length, head_dim) each."""

    k: torch.Tensor
    v: torch.Tensor

    def write(self, slots: torch.Tensor, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v (B, n_kv_heads, T, head_dim) of row b into slot slots[b] at positions input_pos[b] (B, T)."""
        rows = slots[:, None]  # (B, 1) beside input_pos (B, T)
        self.k[rows, :, input_pos] = k.transpose(1, 2).to(self.k.dtype)  # (B, T, Hkv, hd)
        self.v[rows, :, input_pos] = v.transpose(1, 2).to(self.v.dtype)


class KVCache(nn.Module):
    def __init__(self, cfg: ModelConfig, slots: int, length: int, dtype: torch.dtype):
        super().__init__()
        self.slots, self.length = slots, length
        shape = (slots, cfg.n_kv_heads, length, cfg.head_dim)
        for i in range(cfg.n_layers):
            self.register_buffer(f"k{i}", _zeros_on_demand(shape, dtype), persistent=False)
            self.register_buffer(f"v{i}", _zeros_on_demand(shape, dtype), persistent=False)

    def layer(self, i: int) -> LayerCache:
        return LayerCache(getattr(self, f"k{i}"), getattr(self, f"v{i}"))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def copy_prefix(self, other: "KVCache", n: int) -> None:
        """Every slot's first n positions from `other` (same slots, layers and heads)."""
        for mine, theirs in zip(self.buffers(), other.buffers()):
            mine[:, :, :n] = theirs[:, :, :n]
