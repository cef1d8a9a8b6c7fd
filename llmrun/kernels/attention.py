"""Single-query attention over the filled part of a static KV cache (decode steps).

`decode_attention` runs the native kernel (csrc/attention.cpp); `decode_attention_available()`
says whether it is in use here: the x86 extension is built and the kernel backend is x86
(`LLMRUN_KERNEL_BACKEND` may force another). Elsewhere callers keep their own masked
attention over the whole cache. The op reads the query's position at run time, so one
compiled decode step (static shapes) attends over positions [start, pos] only, instead of all
S cache slots with a mask.
"""

from __future__ import annotations

import torch


def decode_attention_available() -> bool:
    """Whether the native kernel is in use here (builds the extension on first call). Ask once,
    outside compiled code: the answer decides which attention a model traces."""
    from . import native
    from .dispatch import default_backend

    return default_backend().startswith("x86") and native.built()


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor,
                     scale: float, softcap: float = 0.0, window: int = 0) -> torch.Tensor:
    """q (B,H,1,D), k/v (B,Hkv,S,D), input_pos (1,) int64 -> (B,H,1,D): attention over positions
    [max(0, pos - window + 1), pos] (window 0: from 0); softcap 0: none. Needs
    decode_attention_available()."""
    from . import native

    return native.DECODE_ATTENTION(q, k, v, input_pos, scale, softcap, window)


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
