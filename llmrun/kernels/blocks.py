"""Block-quantized weights in the neutral layout: unsigned integer codes in groups along K, each
group with its own scale and, for asymmetric formats, its own offset.

    W[n, k] = scales[n, g] * u[n, k] + offsets[n, g]        (offsets given)
    W[n, k] = scales[n, g] * (u[n, k] - 2 ** (bits - 1))    (offsets None: symmetric)
    with g = k // group_size.

This covers llmrun's own int4 (4-bit symmetric, the neutral int4 format of reference.py) and
every GGUF block format llmrun runs as shipped: Q4_0, Q4_1 and Q4_K as 4-bit codes in groups of
32; Q5_0, Q5_1, Q5_K and Q8_0 as 8-bit codes in groups of 32; Q6_K as 8-bit codes in groups of 16.
Each product s * u and s * (u - zero) is exact in float32 for those formats, so dequantize()
gives back `gguf`'s dequantized weights bit for bit (the only rounding, in both, is the add of
an offset).

Storage: `codes` uint8 [N, ceil(K/2)] for 4-bit (even k in the low nibble, odd k in the high
one; an odd K's last high nibble is 8), [N, K] for 8-bit. K is padded to whole groups by the
kernels, never here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CODE_BITS = (4, 8)


@dataclass
class BlockWeight:
    codes: torch.Tensor  # uint8 [N, ceil(K/2)] (bits 4) or [N, K] (bits 8)
    bits: int
    group_size: int
    scales: torch.Tensor  # float32 [N, G], G = ceil(K / group_size)
    offsets: torch.Tensor | None  # float32 [N, G], or None: symmetric around 2 ** (bits - 1)
    in_features: int  # K

    def __post_init__(self):
        N, K = self.codes.shape[0], self.in_features
        if self.bits not in CODE_BITS:
            raise ValueError(f"code bits must be one of {CODE_BITS}, got {self.bits}")
        if self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        width = (K + 1) // 2 if self.bits == 4 else K
        if self.codes.dtype != torch.uint8 or tuple(self.codes.shape) != (N, width):
            raise ValueError(f"codes must be uint8 [{N}, {width}] for {self.bits}-bit codes, "
                             f"got {self.codes.dtype} {tuple(self.codes.shape)}")
        if self.bits == 4 and K % 2 and bool(((self.codes[:, -1] >> 4) != 8).any()):
            raise ValueError("4-bit codes of an odd K must pad the last high nibble with 8 (the zero code)")
        G = -(-K // self.group_size)
        for name in ("scales", "offsets"):
            t = getattr(self, name)
            if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != (N, G)):
                raise ValueError(f"{name} must be float32 [{N}, {G}], got {t.dtype} {tuple(t.shape)}")

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def zero(self) -> int:
        """The code that stands for 0 in a symmetric block."""
        return 1 << (self.bits - 1)

    def unpacked_codes(self) -> torch.Tensor:
        """uint8 u [N, K]."""
        return unpack_codes(self.codes, self.bits, self.in_features)

    def rows(self, start: int, stop: int) -> "BlockWeight":
        """Output rows [start, stop) (views)."""
        sl = slice(start, stop)
        return BlockWeight(self.codes[sl], self.bits, self.group_size, self.scales[sl],
                           None if self.offsets is None else self.offsets[sl], self.in_features)

    def columns(self, start: int, stop: int) -> "BlockWeight":
        """Input columns [start, stop), on whole groups (stop may be K)."""
        if start % self.group_size or (stop % self.group_size and stop != self.in_features):
            raise ValueError(f"columns [{start}, {stop}) do not fall on groups of {self.group_size}")
        g = slice(start // self.group_size, -(-stop // self.group_size))
        codes = self.codes[:, start // 2:(stop + 1) // 2] if self.bits == 4 else self.codes[:, start:stop]
        return BlockWeight(codes.contiguous(), self.bits, self.group_size, self.scales[:, g].contiguous(),
                           None if self.offsets is None else self.offsets[:, g].contiguous(), stop - start)

    def permute_rows(self, index: torch.Tensor) -> "BlockWeight":
        return BlockWeight(self.codes[index].contiguous(), self.bits, self.group_size,
                           self.scales[index].contiguous(),
                           None if self.offsets is None else self.offsets[index].contiguous(),
                           self.in_features)

    def dequantize(self, chunk_rows: int = 4096) -> torch.Tensor:
        """float32 [N, K]: exactly what the formats' own dequantization gives (see
        dequantize_codes), in chunks of rows."""
        out = torch.empty(self.shape, dtype=torch.float32)
        for n0 in range(0, self.out_features, chunk_rows):
            sl = slice(n0, n0 + chunk_rows)
            out[sl] = dequantize_codes(self.codes[sl], self.bits, self.group_size, self.scales[sl],
                                       None if self.offsets is None else self.offsets[sl], self.in_features)
        return out

    # ------------------------------------------------------------------ re-expression
    def widened(self, bits: int, group_size: int, asymmetric: bool) -> "BlockWeight":
        """The same weights, bit for bit, with wider codes, smaller groups or explicit offsets,
        so that layers of different formats can share one kernel call (fused q/k/v, gate/up)."""
        if bits < self.bits or self.group_size % group_size or (self.offsets is not None and not asymmetric):
            raise ValueError(f"cannot express {self.bits}-bit g{self.group_size} codes as "
                             f"{bits}-bit g{group_size}{' asymmetric' if asymmetric else ''}")
        codes = self.codes
        if bits == 8 and self.bits == 4:
            u = self.unpacked_codes()
            # symmetric: u - 8 == (u + 120) - 128; with offsets the codes keep their values
            codes = (u + 120 if self.offsets is None and not asymmetric else u).contiguous()
        scales, offsets = self.scales, self.offsets
        if asymmetric and offsets is None:
            # s * (u - z) == s * u + (-z * s): z * s is exact (z a power of two), so is the sum
            offsets = scales * -float(self.zero)
        rep = self.group_size // group_size
        if rep > 1:
            G = -(-self.in_features // group_size)
            scales = scales.repeat_interleave(rep, 1)[:, :G]
            offsets = None if offsets is None else offsets.repeat_interleave(rep, 1)[:, :G]
        return BlockWeight(codes, bits, group_size, scales.contiguous(),
                           None if offsets is None else offsets.contiguous(), self.in_features)


def unpack_codes(codes: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Neutral codes [n, ceil(K/2) | K] -> uint8 u [n, K]."""
    if bits == 8:
        return codes
    return torch.stack([codes & 0xF, codes >> 4], -1).reshape(codes.shape[0], -1)[:, :K]


def dequantize_codes(codes: torch.Tensor, bits: int, group_size: int, scales: torch.Tensor,
                     offsets: torch.Tensor | None, K: int) -> torch.Tensor:
    """float32 [n, K] = s * u + o (or s * (u - zero)) per element. The products are formed in
    float64, where they are exact, and rounded to float32 once with the add, as the GGUF
    formats' own float32 arithmetic does (its products are exact in float32 too)."""
    u = unpack_codes(codes, bits, K).double()
    s = scales.double().repeat_interleave(group_size, 1)[:, :K]
    if offsets is None:
        return (s * (u - (1 << (bits - 1)))).float()
    return (s * u + offsets.double().repeat_interleave(group_size, 1)[:, :K]).float()


def concat_rows(parts: list[BlockWeight]) -> BlockWeight:
    """Several weights of one input size stacked along N, in the narrowest common form."""
    K = parts[0].in_features
    if any(p.in_features != K for p in parts):
        raise ValueError("concat_rows needs equal in_features")
    bits = max(p.bits for p in parts)
    group = min(p.group_size for p in parts)
    asym = any(p.offsets is not None for p in parts)
    same = [p.widened(bits, group, asym) for p in parts]
    offsets = torch.cat([p.offsets for p in same]) if asym else None
    return BlockWeight(torch.cat([p.codes for p in same]), bits, group, torch.cat([p.scales for p in same]),
                       offsets, K)
