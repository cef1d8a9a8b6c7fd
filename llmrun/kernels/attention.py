"""Attention over the filled part of a static KV cache (csrc/attention.cpp).

`decode_attention` (one query per row: decode steps) and `prefill_attention` (a chunk of
queries per row) run native ops over a cache laid out in slots, (slots, Hkv, S, D), each row
of a call reading its own slot at its own positions. `cache_attention_available()` says
whether they are in use here: the kernel backend is x86 (`LLMRUN_KERNEL_BACKEND` may force
another). Elsewhere callers keep their own masked attention. The ops read positions and slots
at run time, so one compiled step (static or symbolic shapes) attends only over the positions
each query can see, instead of all S cache positions with a mask.
"""

from __future__ import annotations

import torch


def cache_attention_available() -> bool:
    """Whether the native kernel is in use here: the kernel backend is x86, whose extension is
    loaded or can be built (an op's first call waits for a build under way; pipeline.load
    requires the kernels before it returns a model). Ask once, outside compiled code: the answer
    decides which attention a model traces."""
    from .dispatch import default_backend

    return default_backend().startswith("x86")


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor,
                     slots: torch.Tensor, scale: float, softcap: float = 0.0, window: int = 0) -> torch.Tensor:
    """q (B,H,1,D), k/v (slots,Hkv,S,D), input_pos (B,) or (B,1) int64, slots (B,) int64 ->
    (B,H,1,D): row b attends over positions [max(0, pos - window + 1), pos] of slot slots[b]
    (window 0: from 0); softcap 0: none. Needs cache_attention_available()."""
    from . import native

    return native.DECODE_ATTENTION(q, k, v, input_pos, slots, scale, softcap, window)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor,
                      slots: torch.Tensor, scale: float, window: int = 0, bf16_dots: bool = False) -> torch.Tensor:
    """q (B,H,T,D), k/v (slots,Hkv,S,D) (q's dtype), input_pos (B,T) int64, slots (B,) int64 ->
    (B,H,T,D): query t of row b attends over positions [max(0, pos[b,t] - window + 1), pos[b,t]]
    of slot slots[b] (window 0: from 0). bf16_dots: fp32 operands multiplied in bf16 pairs,
    summed in fp32, where the CPU has AVX512-BF16 (`bf16_dots_available()`); elsewhere the flag
    is ignored. Needs cache_attention_available()."""
    from . import native

    return native.PREFILL_ATTENTION(q, k, v, input_pos, slots, scale, window, bf16_dots)


def bf16_dots_available() -> bool:
    """Whether prefill_attention's bf16_dots takes effect here (AVX512-BF16, the AVX512 body)."""
    from . import native

    return native.built() and torch.ops.llmrun.prefill_bf16_dots_available()


def prefill_attention_bf16_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: list[list[int]],
                                     slots: list[int], scale: float, window: int = 0) -> torch.Tensor:
    """prefill_attention with bf16_dots, emulated (tests): q * scale (fp32), k, v and each
    query's weights exp(s - max) (fp32) rounded to bf16; products summed in float64 and divided
    by the unrounded weights' sum. The kernel rounds weights against a running max: rows that
    see more than one slice of 128 positions differ from this by their rounding."""
    rep = q.shape[1] // k.shape[1]

    def bf16(x: torch.Tensor) -> torch.Tensor:
        return x.float().to(torch.bfloat16).double()

    qs = bf16(q.float() * torch.tensor(scale, dtype=torch.float32))
    rows = []
    for b, (row, slot) in enumerate(zip(positions, slots)):
        kk, vv = bf16(k[slot]).repeat_interleave(rep, dim=0), bf16(v[slot]).repeat_interleave(rep, dim=0)  # (H, S, D)
        outs = []
        for t, pos in enumerate(row):
            start = max(0, pos - window + 1) if window > 0 else 0
            scores = qs[b, :, t:t + 1] @ kk[:, start:pos + 1].transpose(-1, -2)  # (H, 1, n)
            e = torch.exp(scores - scores.amax(-1, keepdim=True))
            outs.append((bf16(e) @ vv[:, start:pos + 1]) / e.sum(-1, keepdim=True))
        rows.append(torch.cat(outs, dim=1))
    return torch.stack(rows).to(q.dtype)


def prefill_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: list[list[int]],
                                slots: list[int], scale: float, window: int = 0) -> torch.Tensor:
    """The prefill op's definition in float64 (tests), one query at a time."""
    return torch.cat([
        torch.cat([decode_attention_reference(q[b:b + 1, :, t:t + 1], k, v, [p], [slot], scale, 0.0, window)
                   for t, p in enumerate(row)], dim=2)
        for b, (row, slot) in enumerate(zip(positions, slots))])


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: list[int],
                               slots: list[int], scale: float, softcap: float = 0.0, window: int = 0) -> torch.Tensor:
    """The op's definition in float64 (tests): row b over positions [max(0, pos - window + 1),
    pos] of slot slots[b]."""
    rep = q.shape[1] // k.shape[1]
    outs = []
    for b, (pos, slot) in enumerate(zip(positions, slots)):
        start = max(0, pos - window + 1) if window > 0 else 0
        kk = k[slot, :, start:pos + 1].double().repeat_interleave(rep, dim=0)  # (H, n, D)
        vv = v[slot, :, start:pos + 1].double().repeat_interleave(rep, dim=0)
        scores = (q[b].double() @ kk.transpose(-1, -2)) * scale  # (H, 1, n)
        if softcap > 0:
            scores = torch.tanh(scores / softcap) * softcap
        outs.append(scores.softmax(-1) @ vv)
    return torch.stack(outs).to(q.dtype)
