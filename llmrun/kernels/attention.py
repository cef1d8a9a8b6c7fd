"""Single-query attention over the filled part of a static KV cache (decode steps).

`decode_attention_op()` is the native kernel (csrc/attention.cpp) where the x86 extension is
built and the kernel backend is x86 (`LLMRUN_KERNEL_BACKEND` may force another), else None:
callers then keep their own masked attention over the whole cache. The op reads the query's
position at run time, so one compiled decode step (static shapes) attends over positions
[start, pos] only, instead of all S cache slots with a mask.
"""

from __future__ import annotations

import torch


def decode_attention_op():
    """op(q (B,H,1,D), k, v (B,Hkv,S,D), input_pos (1,) int64, scale, softcap (0: none),
    window (0: none)) -> (B,H,1,D), or None where the native kernel is not in use."""
    from . import native
    from .dispatch import default_backend

    if not default_backend().startswith("x86") or not native.built():
        return None
    return native.DECODE_ATTENTION


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int, scale: float,
                               softcap: float = 0.0, window: int = 0) -> torch.Tensor:
    """The op's definition in float64 (tests): positions [max(0, pos - window + 1), pos]."""
    B, H, _, D = q.shape
    rep = H // k.shape[1]
    start = max(0, pos - window + 1) if window > 0 else 0
    kk = k[:, :, start:pos + 1].double().repeat_interleave(rep, dim=1)  # (B, H, n, D)
    vv = v[:, :, start:pos + 1].double().repeat_interleave(rep, dim=1)
    scores = (q.double() @ kk.transpose(-1, -2)) * scale  # (B, H, 1, n)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    return (scores.softmax(-1) @ vv).to(q.dtype)
