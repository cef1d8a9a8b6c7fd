"""Quantization of weights and the plain-torch, integer-exact reference of the int4 matmul.

Neutral packed int4 format (what llmrun saves; every backend repacks it at load):
  qweight  uint8 [N, ceil(K/2)]: u = q + 8 (0..15), even k in the low nibble, odd k in the
           high nibble (the input layout of torch's `_dyn_quant_pack_4bit_weight`).
  scales   float32 [N, n_groups]: w ~= q * scale; n_groups = ceil(K / group_size), or 1 per
           channel (group_size == 0).
Padding: K is padded with zero weights (q = 0, stored as u = 8) up to an even count for the
nibble pairs and up to a whole number of groups; the last group's scale comes from its real
elements only. Padded weights contribute nothing, whatever the activations there.

Activation quantization (all backends that take int8 activations, x86 and reference):
per row, symmetric: inv = 127 / absmax(x_row), a = round_half_even(x * inv) in [-127, 127],
s_a = absmax / 127 (a zero row gives inv = 0, s_a = 0). Per row rather than per group keeps
one scale per row that factors out of every dot product; symmetric (never -128) keeps the
AVX2 sign tricks safe. The x86 kernel reproduces these float32 operations bit for bit.
(KleidiAI on Arm quantizes per row asymmetrically inside its own op.)

Result: y[m, n] = s_a[m] * sum_g scale[n, g] * S[m, n, g], S = sum_{k in g} a[m, k] q[n, k]
as int32. Per channel the int32 sum runs over all of K.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "rescore_top_k_reference",
    "quantize_int4",
    "quantize_int8",
    "dequantize_int4",
    "unpack_int4",
    "quantize_activations",
    "int4_group_sums_reference",
    "int4_linear_reference",
]

# Candidate divisors of the group's absmax tried by quantize_int4 (see there).
_DIVISORS = tuple(7.0 + 0.25 * i for i in range(9))  # 7.0 .. 9.0


def _n_groups(K: int, group_size: int) -> int:
    return 1 if group_size == 0 else -(-K // group_size)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 (q in [-8, 7]) with one scale per `group_size` inputs (0: per channel).

    Scale rule: for each group, try s = +-absmax / d for d in 7.0, 7.25, ..., 9.0, refine each
    with the least-squares scale for its rounded q (s = <w, q> / <q, q>), and keep the one with
    the smallest squared error. Measured on Gemma 3 270M weights (relative reconstruction MSE,
    blk.3.ffn_down / blk.0.attn_v):
        rule                      g32              g128             per channel
        absmax / 7                0.0119 / 0.0101  0.0197 / 0.0154  0.043 / 0.022
        absmax / 8                0.0108 / 0.0095  0.0159 / 0.0125  0.033 / 0.017
        llama.cpp Q4_0 (max/-8)   0.0090 / 0.0079  0.0152 / 0.0119  0.033 / 0.017
        this search               0.0072 / 0.0070  0.0130 / 0.0105  0.025 / 0.014
    (the sign matters: -max/8 reaches the lone -8 level, so the search tries both signs.)
    Scales are rounded to float16-representable values (stored as float32), which lets the x86
    kernel stream them as fp16 without changing the result.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_int4 expects a 2-D weight, got shape {tuple(weight.shape)}")
    if group_size < 0:
        raise ValueError("group_size must be >= 0 (0 = per channel)")
    N, K = weight.shape
    gs = K if group_size == 0 else group_size
    G = _n_groups(K, group_size)
    qs, ss = [], []
    rows = max(1, (1 << 22) // max(1, G * gs))  # bound temporaries to ~16 MiB of fp32
    for n0 in range(0, N, rows):
        w = weight[n0:n0 + rows].float()
        if G * gs != K:
            w = torch.nn.functional.pad(w, (0, G * gs - K))
        g = w.reshape(w.shape[0], G, gs)
        amax = g.abs().amax(-1, keepdim=True)
        best_err = best_s = None
        for d in _DIVISORS:
            for sign in (1.0, -1.0):
                s = amax * (sign / d)
                safe = torch.where(s == 0, torch.ones_like(s), s)
                q = (g / safe).round().clamp(-8, 7)
                qq = (q * q).sum(-1, keepdim=True)
                s_ls = (g * q).sum(-1, keepdim=True) / qq.clamp_min(1)
                s = torch.where(qq > 0, s_ls, s)
                safe = torch.where(s == 0, torch.ones_like(s), s)
                q = (g / safe).round().clamp(-8, 7)
                err = ((q * s - g) ** 2).sum(-1, keepdim=True)
                if best_err is None:
                    best_err, best_s = err, s
                else:
                    better = err < best_err
                    best_err = torch.where(better, err, best_err)
                    best_s = torch.where(better, s, best_s)
        s = best_s.clamp(-65504.0, 65504.0).half().float()
        safe = torch.where(s == 0, torch.ones_like(s), s)
        q = torch.where(s == 0, torch.zeros_like(g), (g / safe).round().clamp(-8, 7))
        qs.append(pack_int4(q.reshape(w.shape[0], G * gs)[:, :K].to(torch.int8)))  # packed per slice:
        ss.append(s.reshape(w.shape[0], G))  # an unpacked whole (and pack_int4's int16 copy) cost 3 B/weight
    return torch.cat(qs), torch.cat(ss).contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 q [N, K] in [-8, 7] -> neutral uint8 [N, ceil(K/2)] (u = q + 8, even k low)."""
    N, K = q.shape
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if K % 2:
        u = torch.cat([u, torch.full((N, 1), 8, dtype=torch.uint8)], 1)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(qweight: torch.Tensor, K: int) -> torch.Tensor:
    """Neutral uint8 [N, ceil(K/2)] -> int8 q [N, K]."""
    u = torch.stack([qweight & 0xF, qweight >> 4], -1).reshape(qweight.shape[0], -1)[:, :K]
    return u.to(torch.int8) - 8


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, group_size: int, K: int) -> torch.Tensor:
    q = unpack_int4(qweight, K).float()
    gs = K if group_size == 0 else group_size
    s = scales.float().repeat_interleave(gs, 1)[:, :K]
    return q * s


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel symmetric int8: q = round(w / s) in [-127, 127], s = absmax / 127."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_int8 expects a 2-D weight, got shape {tuple(weight.shape)}")
    out_q, out_s = [], []
    rows = max(1, (1 << 24) // max(1, weight.shape[1]))
    for n0 in range(0, weight.shape[0], rows):
        w = weight[n0:n0 + rows].float()
        s = w.abs().amax(1) / 127.0
        safe = torch.where(s == 0, torch.ones_like(s), s)
        out_q.append((w / safe[:, None]).round().clamp(-127, 127).to(torch.int8))
        out_s.append(s)
    return torch.cat(out_q), torch.cat(out_s).float()


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of x [M, K] -> (a int8 [M, K], s_a float32 [M]); exactly the
    float32 operations of the x86 kernel."""
    xf = x.float()
    amax = xf.abs().amax(1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / torch.where(amax > 0, amax, torch.ones_like(amax)),
                      torch.zeros_like(amax))
    a = (xf * inv).round().clamp(-127, 127).to(torch.int8)
    return a, (amax / 127.0).reshape(-1)


def int4_group_sums_reference(a: torch.Tensor, qweight: torch.Tensor, group_size: int, K: int) -> torch.Tensor:
    """Exact int32 sums S[m, n, g] = sum_{k in group g} a[m, k] * q[n, k]."""
    q = unpack_int4(qweight, K).to(torch.int32)
    M, N = a.shape[0], q.shape[0]
    gs = K if group_size == 0 else group_size
    G = _n_groups(K, group_size)
    pad = G * gs - K
    a32 = torch.nn.functional.pad(a.to(torch.int32), (0, pad)).reshape(M, G, gs)
    q32 = torch.nn.functional.pad(q, (0, pad)).reshape(N, G, gs)
    # int64 einsum is exact; values fit int32 for any realistic K
    return torch.einsum("mgk,ngk->mng", a32.long(), q32.long()).to(torch.int32)


def int4_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, K: int,
                          return_sums: bool = False):
    """Integer-exact reference: y = s_a * sum_g scale[n, g] * S[m, n, g] in float32, cast to
    x.dtype. With return_sums=True also returns (S int32 [M, N, G], a int8 [M, K], s_a)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    a, sa = quantize_activations(x2)
    S = int4_group_sums_reference(a, qweight, group_size, K)
    y = (S.float() * scales.float()[None]).sum(-1) * sa[:, None]
    y = y.to(x.dtype).reshape(*lead, qweight.shape[0])
    if return_sums:
        return y, (S, a, sa)
    return y


def rescore_top_k_reference(y: torch.Tensor, x: torch.Tensor, rows: Callable[[torch.Tensor], torch.Tensor],
                            k: int) -> torch.Tensor:
    """y (M, N) float32 with each row's k largest entries replaced by x . rows(their indices):
    rows maps (M, k) indices to (M, k, K) float32 weight rows (RescoredLinear's second pass)."""
    idx = y.topk(min(k, y.shape[-1]), dim=-1, sorted=False).indices  # (M, k)
    exact = torch.bmm(rows(idx), x.unsqueeze(-1)).squeeze(-1)  # (M, k)
    return y.scatter(-1, idx, exact)
