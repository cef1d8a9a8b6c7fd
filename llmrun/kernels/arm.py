"""Arm (aarch64) int4 x int8 matmul through PyTorch's KleidiAI ops.

torch ships two ATen ops backed by Arm's KleidiAI micro-kernels (torch >= 2.6):

- ``aten._dyn_quant_pack_4bit_weight(weights, scales, bias, block_size, K, N)`` packs int4
  weights and their scales once, at load, into KleidiAI's private layout (a flat uint8
  tensor whose size only KleidiAI knows);
- ``aten._dyn_quant_matmul_4bit(x, packed, block_size, K, N)`` quantizes ``x`` to int8 and
  multiplies: the GEMV (M == 1) kernel uses the ``sdot`` (dotprod) instructions, M > 1 uses
  the ``smmla`` (I8MM) kernels where the CPU has them.

This module only builds their arguments. The rules (from aten/src/ATen/native/cpu/
int4mm_kernel.cpp and kleidiai/kai_kernels.cpp):

- weights: uint8 ``[N, K/2]`` of ``u = q + 8`` (symmetric int4 stored unsigned), even k in the
  low nibble, odd k in the high nibble. That is llmrun's neutral format, so nothing moves.
- per channel: ``block_size == K`` and fp32 scales ``[N]``.
- group-wise: ``block_size % 32 == 0``, ``K % block_size == 0`` and **bf16** scales
  ``[N, K / block_size]`` (KleidiAI's qsi4c32p kernels read bf16 scales: they are rounded).
- llmrun's odd K or partial last group: padded with zero weights (and x with zeros).
- a scale dtype that does not match takes torch's scalar reference path *silently* (the
  "packed" tensor then is fp32 weights + scales concatenated, and the matmul is a scalar
  loop), and so does a CPU without dotprod. Dtypes here are therefore exact, and
  :func:`is_supported` probes that the real KleidiAI packing is taken.
- ``x`` is read through a raw pointer as a contiguous 2-D fp32 matrix; bf16 input is
  accepted natively only for per-channel weights and only from torch 2.10 on (older torch
  and group-wise weights: convert to fp32 and back).

Activation quantization (the scheme that differs from llmrun's x86 kernels):
KleidiAI quantizes every row of ``x`` to int8 inside the op, **asymmetrically**
(``kai_lhs_quant_pack_qai8dxp_f32``, "qai8dx" = quantized asymmetric int8, dynamic, per row):
``scale = 255 / (max(x_max, 0) - min(x_min, 0))``, a zero point nudged to an integer in
[-128, 127], ``a = clamp(round(x * scale) + zp, -128, 127)``. The row's ``-zp`` and
``1/scale`` travel with the packed row, and the packed weights carry per-column sums
(computed at pack time), so the zero-point correction costs one multiply-add per output.
torch's x86 reference of the same op uses the same scheme. llmrun's x86 kernels quantize
activations *symmetrically* (``scale = 127 / max|x|``, no zero point) instead, because
``vpdpbusd`` multiplies an unsigned byte by a signed byte: the weights are kept as unsigned
nibbles (q + 8) and the activations as the signed operand, corrected by ``8 * sum(a)`` per
group; an activation zero point there would add a second correction per group. Arm's
``sdot``/``smmla`` are signed x signed (the packing turns the unsigned nibbles into signed
int4, qsu4 -> qsi4), and the asymmetric range spends all 256 levels on a skewed row (e.g.
after SiLU), so results differ from x86 by a fraction of one activation step per element,
not by a bug.
"""

from __future__ import annotations

import functools
import platform
import warnings

import torch

__all__ = ["is_supported", "pack", "matmul"]

_ARM_MACHINES = ("aarch64", "arm64")


def _is_aarch64() -> bool:
    return platform.machine().lower() in _ARM_MACHINES


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


# Per-channel bf16 activations go straight into KleidiAI's int4-bf16 kernels from torch 2.10
# on (pytorch/pytorch#158250); before that the op reads x as fp32 whatever its dtype.
_BF16_CHANNELWISE = _torch_version() >= (2, 10)


def _has_ops() -> bool:
    return hasattr(torch.ops.aten, "_dyn_quant_pack_4bit_weight") and hasattr(
        torch.ops.aten, "_dyn_quant_matmul_4bit"
    )


@functools.lru_cache(maxsize=1)
def _probe() -> str | None:
    """None when the KleidiAI path is really taken here, else the reason why not."""
    if not _is_aarch64():
        return f"not an aarch64 CPU ({platform.machine()})"
    if not _has_ops():
        return f"torch {torch.__version__} lacks the _dyn_quant_*_4bit ops (needs >= 2.6)"
    kleidiai = getattr(torch.backends, "kleidiai", None)
    if kleidiai is None or not kleidiai.is_available():
        return f"torch {torch.__version__} was built without KleidiAI"
    # The op also falls back when the CPU lacks dotprod (cpuinfo_has_arm_neon_dot): a
    # packed tensor in KleidiAI's layout is uint8, the reference layout is fp32.
    N, K = 8, 32
    weights = torch.full((N, K // 2), 0x88, dtype=torch.uint8)
    scales = torch.ones(N, dtype=torch.float32)
    packed = torch.ops.aten._dyn_quant_pack_4bit_weight(weights, scales, None, K, K, N)
    if packed.dtype != torch.uint8:
        return "KleidiAI did not take the packing (CPU without the dotprod extension?)"
    return None


_warned = False


def is_supported() -> bool:
    """True on aarch64 when torch's KleidiAI int4 kernels are really used.

    Warns once (one line) on aarch64 when they are not, since every Int4Linear then takes
    the slower generic path.
    """
    global _warned
    reason = _probe()
    if reason is not None and _is_aarch64() and not _warned:
        _warned = True
        warnings.warn(f"llmrun: KleidiAI int4 kernels unavailable: {reason}", stacklevel=2)
    return reason is None


def _layout(group_size: int, K: int) -> tuple[int, int]:
    """(block_size, K_pad) of the op for llmrun's (group_size, K).

    llmrun's neutral format allows an odd K and a partial last group (padded with q = 0);
    the op needs an even K and whole groups, so K is padded to K_pad with zero weights, and
    x with zero columns at matmul (zero is exact in the activation quantization: its range
    always includes 0). One group spanning K is per channel (fp32 scales, block_size K_pad).
    """
    if K <= 0:
        raise ValueError(f"KleidiAI int4: K must be positive, got K={K}")
    if group_size < 0:
        raise ValueError(f"KleidiAI int4: group size must be >= 0, got {group_size}")
    if group_size == 0 or group_size >= K:
        k_pad = K + K % 2
        return k_pad, k_pad
    if group_size % 32:
        raise ValueError(
            f"KleidiAI int4: group size {group_size} is not supported (K={K}): KleidiAI "
            "takes groups that are a multiple of 32 (32, 64, 128, 256, ...) or 0 for "
            "per-channel scales; requantize with such a group size or use another backend"
        )
    return group_size, -(-K // group_size) * group_size


def pack(
    qweight: torch.Tensor, scales: torch.Tensor, group_size: int, K: int, N: int
) -> torch.Tensor:
    """Pack llmrun's neutral int4 weights for :func:`matmul`.

    qweight: uint8 ``[N, ceil(K/2)]``, ``u = q + 8`` nibbles, even k low, odd k high.
    scales: float ``[N, ceil(K/group_size)]`` (``[N, 1]`` or ``[N]`` per channel);
    dequantized w = q * scale. group_size: 0 for per channel, else the group length along K.
    Returns KleidiAI's packed uint8 buffer (torch's fp32 reference layout where KleidiAI is
    not available, e.g. on x86: correct, slow). Group-wise scales are rounded to bf16 (the
    kernels' scale type), per-channel ones stay fp32.
    Raises ValueError for group sizes KleidiAI cannot take and for malformed arguments.
    """
    if N <= 0:
        raise ValueError(f"KleidiAI int4: N must be positive, got N={N}")
    block_size, k_pad = _layout(group_size, K)
    n_groups = k_pad // block_size
    if qweight.dtype != torch.uint8:
        raise ValueError(f"KleidiAI int4: qweight must be uint8, got {qweight.dtype}")
    if tuple(qweight.shape) != (N, (K + 1) // 2):
        raise ValueError(
            f"KleidiAI int4: qweight must be [N, ceil(K/2)] = [{N}, {(K + 1) // 2}], "
            f"got {list(qweight.shape)}"
        )
    if not scales.is_floating_point():
        raise ValueError(f"KleidiAI int4: scales must be floating point, got {scales.dtype}")
    if scales.numel() != N * n_groups or scales.shape[0] != N:
        raise ValueError(
            f"KleidiAI int4: scales must be [N, ceil(K/group)] = [{N}, {n_groups}], "
            f"got {list(scales.shape)}"
        )
    if block_size == k_pad:
        scales = scales.reshape(N).to(torch.float32).contiguous()
    else:
        scales = scales.reshape(N, n_groups).to(torch.bfloat16).contiguous()
    if k_pad // 2 != qweight.shape[1]:  # whole bytes of u = 8 (q = 0) up to K_pad
        pad = qweight.new_full((N, k_pad // 2 - qweight.shape[1]), 0x88)
        qweight = torch.cat([qweight, pad], dim=1)
    qweight = qweight.contiguous()
    packed = torch.ops.aten._dyn_quant_pack_4bit_weight(
        qweight, scales, None, block_size, k_pad, N
    )
    if packed.dtype != torch.uint8 and _is_aarch64():
        is_supported()  # warns once why KleidiAI is not used
    return packed


def matmul(
    x2d: torch.Tensor, packed: torch.Tensor, group_size: int, K: int, N: int
) -> torch.Tensor:
    """``x2d [M, K] @ W.T -> [M, N]`` with W packed by :func:`pack`; output in x2d's dtype.

    x is quantized per row to asymmetric int8 inside the op (see the module docstring).
    """
    if x2d.dim() != 2 or x2d.shape[1] != K:
        raise ValueError(f"KleidiAI int4: x must be [M, K={K}], got {list(x2d.shape)}")
    if not x2d.is_floating_point():
        raise ValueError(f"KleidiAI int4: x must be floating point, got {x2d.dtype}")
    block_size, k_pad = _layout(group_size, K)
    out_dtype = x2d.dtype
    if x2d.shape[0] == 0:
        return x2d.new_empty((0, N))
    if out_dtype == torch.bfloat16 and block_size == k_pad and _BF16_CHANNELWISE:
        x = x2d.contiguous()
    else:
        x = x2d.to(torch.float32).contiguous()
    if k_pad != K:
        x = torch.nn.functional.pad(x, (0, k_pad - K))
    y = torch.ops.aten._dyn_quant_matmul_4bit(x, packed, block_size, k_pad, N)
    return y if y.dtype == out_dtype else y.to(out_dtype)
