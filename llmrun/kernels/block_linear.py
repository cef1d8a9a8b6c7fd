"""BlockLinear: a linear layer over block-quantized weights (blocks.py: GGUF's formats as
shipped, asymmetric int4), and the integer-exact reference it is tested against."""

from __future__ import annotations

import warnings

import torch

from . import native
from .blocks import BlockWeight, concat_rows, dequantize_codes, unpack_codes
from .dispatch import resolve_backend
from .modules import _PackedLinear


def quantize_activations_grouped(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (a int8 [M, G * group_size], zero past K; s_a float32 [M, G]): symmetric int8
    per row and group of inputs, exactly the float32 operations of block_mm (blockmm.cpp)."""
    M, K = x.shape
    G = -(-K // group_size)
    xg = torch.nn.functional.pad(x.float(), (0, G * group_size - K)).view(M, G, group_size)
    amax = xg.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / torch.where(amax > 0, amax, torch.ones_like(amax)),
                      torch.zeros_like(amax))
    a = (xg * inv).round().clamp(-127, 127).to(torch.int8)
    return a.view(M, G * group_size), (amax / 127.0).view(M, G)


def block_linear_reference(x: torch.Tensor, bw: BlockWeight) -> torch.Tensor:
    """x [M, K] -> float32 [M, N]: the activations quantized as the kernels quantize them
    (quantize_activations_grouped), each group's integer sums S = sum a u and A = sum a formed
    exactly, then sum_g s_a,g (s S + o A), or sum_g s_a,g s (S - zero A), in float64. One
    group at a time: temporaries of [M, N] and [N, group], whatever the layer's size."""
    K, gs, G = bw.in_features, bw.group_size, bw.scales.shape[1]
    a, sa = quantize_activations_grouped(x, gs)
    u = torch.nn.functional.pad(unpack_codes(bw.codes, bw.bits, K), (0, G * gs - K), value=bw.zero)  # (N, G*gs)
    y = torch.zeros(x.shape[0], bw.out_features, dtype=torch.float64)
    for g in range(G):
        ag = a[:, g * gs:(g + 1) * gs].double()  # (M, gs)
        S = ag @ u[:, g * gs:(g + 1) * gs].double().T  # (M, N), exact: integers far below 2^53
        A = ag.sum(-1, keepdim=True)  # (M, 1)
        s = bw.scales[:, g].double()
        if bw.offsets is None:
            part = (S - bw.zero * A) * s
        else:
            part = S * s + A * bw.offsets[:, g].double()
        y += part * sa[:, g:g + 1].double()
    return y.float()


class BlockLinear(_PackedLinear):
    """y = x @ W^T (+ bias) with W block-quantized (BlockWeight) and x quantized to int8 on the
    fly, one scale per row and weight group; forward keeps x's dtype (fp32 or bf16). x86 keeps only its packed panels (the
    neutral tensors are re-derived from them exactly); other backends keep the neutral tensors
    and run block_linear_reference.

    State dict: codes, scales, offsets (asymmetric only), layout int32 [bits, group_size], bias.
    Fusion: BlockLinear.concat(layers) with out_splits, as Int4Linear.concat.
    """

    PACKED = _PackedLinear.PACKED + ("of", "codes", "offsets")

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, backend: str):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.backend = bits, group_size, backend
        self.out_splits: list[int] = [out_features]
        self.bias: torch.nn.Parameter | None = None
        self._isa: int | None = None

    @classmethod
    def from_blocks(cls, bw: BlockWeight, bias: torch.Tensor | None = None,
                    backend: str | None = None) -> "BlockLinear":
        name = resolve_backend(backend)
        if name == "arm-kleidiai":
            warnings.warn("llmrun: KleidiAI takes symmetric int4 only: this model's block-quantized layers "
                          "(a GGUF's formats as shipped, or asymmetric int4) run on the slow reference; "
                          "--weights int4 --int4 symmetric runs them on KleidiAI", stacklevel=2)
        if not (name.startswith("x86") and bw.group_size % (8 if bw.bits == 4 else 4) == 0):
            name = "reference"
        m = cls(bw.in_features, bw.out_features, bw.bits, bw.group_size, name)
        m._set_blocks(bw)
        m._set_bias(bias)
        return m

    def _set_blocks(self, bw: BlockWeight) -> None:
        if self.backend.startswith("x86"):
            w, sc, of = native.pack_blocks(bw)
            self._keep(w=w, sc=sc, of=of)
            self._isa = native.isa_code(self.backend)
        else:
            offsets = bw.offsets if bw.offsets is not None else torch.empty(0)
            self._keep(codes=bw.codes.contiguous(), scales=bw.scales.contiguous(), offsets=offsets)
            self._isa = None

    def blocks(self) -> BlockWeight:
        """The neutral weights, exactly as given."""
        if self._isa is not None:
            return native.unpack_blocks(self.w, self.sc, self.of, self.bits, self.group_size, self.in_features,
                                        self.out_features)
        offsets = self.offsets if self.offsets.numel() else None
        return BlockWeight(self.codes, self.bits, self.group_size, self.scales, offsets, self.in_features)

    @classmethod
    def concat(cls, layers: list["BlockLinear"], backend: str | None = None) -> "BlockLinear":
        """One layer computing all `layers` (same input size) in one call; layers of different
        formats are re-expressed in their common form first (BlockWeight.widened: the same
        weights; with smaller groups the activations' groups shrink too)."""
        if not layers:
            raise ValueError("concat needs at least one layer")
        biases = [l.bias if l.bias is not None else torch.zeros(l.out_features) for l in layers]
        bias = torch.cat(biases) if any(l.bias is not None for l in layers) else None
        m = cls.from_blocks(concat_rows([l.blocks() for l in layers]), bias, backend or layers[0].backend)
        m.out_splits = [l.out_features for l in layers]
        return m

    # ---------------------------------------------------------------- state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        bw = self.blocks()
        destination[prefix + "codes"] = bw.codes
        destination[prefix + "scales"] = bw.scales
        if bw.offsets is not None:
            destination[prefix + "offsets"] = bw.offsets
        destination[prefix + "layout"] = torch.tensor([self.bits, self.group_size], dtype=torch.int32)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        keys = ("codes", "scales", "layout")
        missing_keys.extend(prefix + k for k in keys if prefix + k not in state_dict)
        if all(prefix + k in state_dict for k in keys):
            self.bits, self.group_size = (int(v) for v in state_dict[prefix + "layout"])
            offsets = state_dict.get(prefix + "offsets")
            self._set_blocks(BlockWeight(state_dict[prefix + "codes"].contiguous(), self.bits, self.group_size,
                                         state_dict[prefix + "scales"].float().contiguous(),
                                         None if offsets is None else offsets.float().contiguous(),
                                         self.in_features))
        if prefix + "bias" in state_dict:
            self._set_bias(state_dict[prefix + "bias"])

    # ---------------------------------------------------------------- use
    def embed(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows `ids` of W, dequantized exactly ([...] -> [..., K]): a tied embedding reads the
        head's table instead of keeping a second copy."""
        flat = ids.reshape(-1).long()
        if self._isa is not None:
            codes, scales, offsets = native.block_rows(self.w, self.sc, self.of, self.bits, self.in_features, flat)
        else:
            codes, scales = self.codes[flat], self.scales[flat]
            offsets = self.offsets[flat] if self.offsets.numel() else None
        rows = dequantize_codes(codes, self.bits, self.group_size, scales, offsets, self.in_features)
        return rows.to(dtype).reshape(*ids.shape, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K, N = self.in_features, self.out_features
        x2 = x.reshape(-1, K)
        if x2.dtype not in (torch.float32, torch.bfloat16):
            x2 = x2.float()
        if self._isa is not None:
            y = native.BLOCK_MM(x2, self.w, self.sc, self.of, self.bits, self.group_size, K, N, self._isa)
        else:
            y = block_linear_reference(x2, self.blocks()).to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], N).to(x.dtype)

    def extra_repr(self) -> str:
        kind = "asymmetric" if (self.of if self._isa is not None else self.offsets).numel() else "symmetric"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, {kind}, backend={self.backend}")
