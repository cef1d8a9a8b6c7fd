"""Reshaping checkpoint tensors as families need: plain tensors and block-quantized GGUF
weights (kept as shipped) alike."""

from __future__ import annotations

import torch

from llmrun.kernels.blocks import BlockWeight


def unpermute_qk(w: torch.Tensor | BlockWeight, n_heads: int) -> torch.Tensor | BlockWeight:
    """Undo the row permutation llama.cpp's converter applies to q/k of models whose rope it
    runs on interleaved pairs (its rows: interleaved pairs -> Hugging Face's rotate-half halves)."""
    rows = w.shape[0]
    order = torch.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).transpose(1, 2).reshape(-1)
    return w.permute_rows(order) if isinstance(w, BlockWeight) else w[order]


def split_rows(w: torch.Tensor | BlockWeight, sizes: list[int]) -> list[torch.Tensor | BlockWeight]:
    """A fused projection's weight [sum(sizes), K] (or bias) -> its parts, in order."""
    if sum(sizes) != w.shape[0]:
        raise ValueError(f"{w.shape[0]} rows do not split into {sizes}")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    if isinstance(w, BlockWeight):
        return [w.rows(s, s + n) for s, n in zip(starts, sizes)]
    return [w[s:s + n] for s, n in zip(starts, sizes)]
