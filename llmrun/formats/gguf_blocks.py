"""GGUF quantized tensors decoded into llmrun's neutral block weights (llmrun.kernels.blocks).

Each GGUF block format maps onto unsigned codes u, a float32 scale per group and, for the
asymmetric formats, a float32 offset per group, such that BlockWeight.dequantize() gives back
`gguf.quants.dequantize` bit for bit:

    Q4_0  4-bit, g32   u = nibble                     scale d              symmetric (zero 8)
    Q4_1  4-bit, g32   u = nibble                     scale d              offset m
    Q4_K  4-bit, g32   u = nibble                     scale d*sc_j         offset -(dmin*mn_j)
    Q5_0  8-bit, g32   u = u5 + 112                   scale d              symmetric (zero 128)
    Q5_1  8-bit, g32   u = u5                         scale d              offset m
    Q5_K  8-bit, g32   u = u5                         scale d*sc_j         offset -(dmin*mn_j)
    Q6_K  8-bit, g16   u = q6 + 96                    scale d*sc_j         symmetric (zero 128)
    Q8_0  8-bit, g32   u = int8 code + 128            scale d              symmetric (zero 128)

The symmetric formats shift their codes so that GGUF's zero point (8, 16, 32 or 0) lands on the
neutral 2 ** (bits - 1). Scales are formed exactly as gguf forms them (fp16 widened to float32,
then a float32 product with the small integer sub-block scale); those products, and each
scale * code, are exact in float32, so the only rounding left is the add of an offset, which
both sides round once.

GGUF packs nibbles by halves (byte j of a run holds element j low and element j + run high);
the neutral layout packs neighbours (element 2p low, 2p + 1 high), so the 4-bit formats re-pack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from llmrun.kernels.blocks import BlockWeight

SHIPPED_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")

# Rows decoded at a time: keeps every temporary to a few MB whatever the tensor's size.
CHUNK_ROWS = 4096

# A block decoder maps uint8 blocks [n, nb, block_bytes] to (codes [n, nb, code bytes per block],
# scales [n, nb, groups per block], offsets like scales or None).
Decoded = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def _fp16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The little-endian fp16 field at byte `at` of each block, widened to float32 [n, nb]."""
    field = np.ascontiguousarray(blocks[..., at:at + 2])
    return field.view("<f2")[..., 0].astype(np.float32)


def _nibbles_by_halves(qs: np.ndarray) -> np.ndarray:
    """GGUF's nibble runs [..., run] (byte j: element j low, j + run high) as values [..., 2 * run]."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _repack_halves(qs: np.ndarray) -> np.ndarray:
    """GGUF's nibble runs [..., run] re-packed in place order: byte p holds element 2p (low)
    and 2p + 1 (high) of the same run of 2 * run elements."""
    even, odd = qs[..., 0::2], qs[..., 1::2]
    first = (even & 0x0F) | (odd << 4)  # elements 0 .. run-1: the low nibbles
    second = (even >> 4) | (odd & 0xF0)  # elements run .. 2*run-1: the high nibbles
    return np.concatenate([first, second], axis=-1)


def _bits32(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 4-byte high-bit word [..., 4] as bits [..., 32]: bit i belongs to element i."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes [..., 12] of 6-bit (scale, min) pairs as uint8 sc, mn [..., 8].

    Bytes 0-3 hold sc 0-3 in their low 6 bits, bytes 4-7 mn 0-3; sub-blocks 4-7 take their
    low 4 bits from bytes 8-11 (sc low nibble, mn high nibble) and their top 2 bits from the
    top 2 bits of bytes 0-3 (sc) and 4-7 (mn)."""
    d, m, md = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's per-sub-block float32 scale d*sc and offset -(dmin*mn), [n, nb, 8]."""
    d, dmin = _fp16(blocks, 0), _fp16(blocks, 2)
    sc, mn = _k_scale_min(blocks[..., 4:16])
    return d[..., None] * sc.astype(np.float32), -(dmin[..., None] * mn.astype(np.float32))


def _q4_0(blocks: np.ndarray) -> Decoded:
    return _repack_halves(blocks[..., 2:18]), _fp16(blocks, 0)[..., None], None


def _q4_1(blocks: np.ndarray) -> Decoded:
    return _repack_halves(blocks[..., 4:20]), _fp16(blocks, 0)[..., None], _fp16(blocks, 2)[..., None]


def _q4_k(blocks: np.ndarray) -> Decoded:
    n, nb = blocks.shape[:2]
    qs = blocks[..., 16:144].reshape(n, nb, 4, 32)  # 4 runs of 32 bytes, 64 elements each
    scales, offsets = _k_scales(blocks)
    return _repack_halves(qs).reshape(n, nb, 128), scales, offsets


def _u5(qh_bits: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """5-bit values of a 32-element Q5_0/Q5_1 block: low nibbles by halves, bit 4 from qh."""
    return _nibbles_by_halves(qs) | (qh_bits << 4)


def _q5_0(blocks: np.ndarray) -> Decoded:
    u5 = _u5(_bits32(blocks[..., 2:6]), blocks[..., 6:22])
    return u5 + np.uint8(128 - 16), _fp16(blocks, 0)[..., None], None


def _q5_1(blocks: np.ndarray) -> Decoded:
    u5 = _u5(_bits32(blocks[..., 4:8]), blocks[..., 8:24])
    return u5, _fp16(blocks, 0)[..., None], _fp16(blocks, 2)[..., None]


def _q5_k(blocks: np.ndarray) -> Decoded:
    n, nb = blocks.shape[:2]
    qh = blocks[..., 16:48]  # bit j of byte i: bit 4 of element 32j + i
    qs = blocks[..., 48:176].reshape(n, nb, 4, 32)  # as Q4_K
    high = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    u5 = _nibbles_by_halves(qs).reshape(n, nb, 256) | (high.reshape(n, nb, 256) << 4)
    scales, offsets = _k_scales(blocks)
    return u5, scales, offsets


def _q6_k(blocks: np.ndarray) -> Decoded:
    """Two halves of 128 elements; element r of a half takes its low 4 bits from nibble
    r // 64 of ql byte r % 64 and its top 2 bits from bit pair r // 32 of qh byte r % 32."""
    n, nb = blocks.shape[:2]
    ql = blocks[..., 0:128].reshape(n, nb, 2, 64)
    qh = blocks[..., 128:192].reshape(n, nb, 2, 32)
    low = _nibbles_by_halves(ql)
    high = (qh[..., None, :] >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3
    q6 = low | (high.reshape(n, nb, 2, 128) << 4)
    sc = blocks[..., 192:208].view(np.int8).astype(np.float32)
    scales = _fp16(blocks, 208)[..., None] * sc
    return q6.reshape(n, nb, 256) + np.uint8(128 - 32), scales, None


def _q8_0(blocks: np.ndarray) -> Decoded:
    return blocks[..., 2:34] ^ np.uint8(0x80), _fp16(blocks, 0)[..., None], None


@dataclass(frozen=True)
class _Format:
    bits: int
    group_size: int
    asymmetric: bool
    decode_blocks: Callable[[np.ndarray], Decoded]


_FORMATS = {
    "Q4_0": _Format(4, 32, False, _q4_0),
    "Q4_1": _Format(4, 32, True, _q4_1),
    "Q4_K": _Format(4, 32, True, _q4_k),
    "Q5_0": _Format(8, 32, False, _q5_0),
    "Q5_1": _Format(8, 32, True, _q5_1),
    "Q5_K": _Format(8, 32, True, _q5_k),
    "Q6_K": _Format(8, 16, False, _q6_k),
    "Q8_0": _Format(8, 32, False, _q8_0),
}


def _blocks(data: np.ndarray, qtype: str, shape: tuple[int, int]) -> np.ndarray:
    """`data` checked against (qtype, shape) and viewed as uint8 blocks [N, blocks per row, bytes]."""
    if qtype not in _FORMATS:
        raise ValueError(f"GGUF tensor type {qtype} cannot be decoded to block weights "
                         f"(supported: {', '.join(SHIPPED_TYPES)})")
    N, K = shape
    block_elems, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    if K % block_elems:
        raise ValueError(f"{qtype} rows of {K} elements are not whole blocks of {block_elems}")
    data = np.asarray(data)
    if data.dtype != np.uint8:
        raise ValueError(f"{qtype} tensor data must be uint8 bytes, got {data.dtype}")
    nb = K // block_elems
    if data.size != N * nb * block_bytes:
        raise ValueError(f"{qtype} tensor of shape {N}x{K} needs {N * nb * block_bytes} bytes, "
                         f"got {data.size}")
    return data.reshape(N, nb, block_bytes)


def decode(data: np.ndarray, qtype: str, shape: tuple[int, int]) -> BlockWeight:
    """The GGUF tensor bytes `data` (as GGUFReader gives them) of type `qtype` ("Q4_0", ...)
    and shape (N, K) = (rows, elements per row) as a BlockWeight. Raises ValueError for other
    types or a byte count that does not match."""
    blocks = _blocks(data, qtype, shape)
    fmt = _FORMATS[qtype]
    N, K = shape
    width = K // 2 if fmt.bits == 4 else K
    G = K // fmt.group_size
    codes = torch.empty((N, width), dtype=torch.uint8)
    scales = torch.empty((N, G), dtype=torch.float32)
    offsets = torch.empty((N, G), dtype=torch.float32) if fmt.asymmetric else None
    codes_np, scales_np = codes.numpy(), scales.numpy()
    offsets_np = None if offsets is None else offsets.numpy()
    for n0 in range(0, N, CHUNK_ROWS):
        part = slice(n0, min(n0 + CHUNK_ROWS, N))
        c, s, o = fmt.decode_blocks(blocks[part])
        n = c.shape[0]
        codes_np[part] = c.reshape(n, width)
        scales_np[part] = s.reshape(n, G)
        if offsets_np is not None:
            offsets_np[part] = o.reshape(n, G)
    return BlockWeight(codes, fmt.bits, fmt.group_size, scales, offsets, K)
