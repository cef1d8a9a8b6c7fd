"""Int4Linear and Int8Linear: quantized linear layers that pick a backend at construction."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native
from .dispatch import arm_module, resolve_backend
from .reference import int4_linear_reference, rescore_top_k_reference


def _float_bias(bias: torch.Tensor | None) -> torch.nn.Parameter | None:
    """A layer's bias as kept: a float32 copy, frozen."""
    return None if bias is None else torch.nn.Parameter(bias.detach().float().clone(), requires_grad=False)


class _PackedLinear(torch.nn.Module):
    """What Int4Linear and Int8Linear share: packed tensors kept as non-persistent buffers,
    and a state dict in the neutral format (qweight, scales, bias).

    The packed tensors are buffers so that exported graphs and AOTInductor packages name them
    (a compiled package is fed this module's tensors by name, without copying them), but
    Module.to(dtype/device) leaves them alone: the kernels need them exactly as packed, on the
    CPU. Their layout is the backend's; the state dict holds the neutral tensors instead.
    """

    PACKED = ("w", "sc", "corr", "qweight", "scales", "scales_bf16", "arm_packed")

    def _keep(self, **tensors: torch.Tensor) -> None:
        for name in self.PACKED:
            self._buffers.pop(name, None)
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor, persistent=False)

    def _set_bias(self, bias: torch.Tensor | None) -> None:
        self.bias = _float_bias(bias)

    def _apply(self, fn, recurse=True):
        packed = {n: self._buffers.pop(n) for n in self.PACKED if n in self._buffers}
        try:
            return super()._apply(fn, recurse)
        finally:
            self._buffers.update(packed)

    def _saved_scales(self, scales: torch.Tensor) -> torch.Tensor:
        """Scales as read from a state dict -> the shape _set_weights takes."""
        return scales.float().contiguous()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        qweight, scales = self.neutral()
        destination[prefix + "qweight"] = qweight
        destination[prefix + "scales"] = scales
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for key in ("qweight", "scales"):
            if prefix + key not in state_dict:
                missing_keys.append(prefix + key)
        if prefix + "qweight" in state_dict and prefix + "scales" in state_dict:
            self._set_weights(state_dict[prefix + "qweight"].contiguous(),
                              self._saved_scales(state_dict[prefix + "scales"]))
        if prefix + "bias" in state_dict:
            self._set_bias(state_dict[prefix + "bias"])


class Int4Linear(_PackedLinear):
    """y = x @ W^T (+ bias) with W int4 (neutral format, see llmrun.kernels.reference) and x
    quantized per row to int8 on the fly. forward keeps x's dtype (fp32 or bf16).

    Memory: only the backend's private layout is kept. On x86 the neutral tensors are
    re-derived from it exactly (neutral(), state_dict) - no second copy. The reference backend
    keeps the neutral tensors themselves; the Arm backend keeps the neutral copy too (KleidiAI's
    packing cannot be undone), which costs one extra ~0.56 byte per weight.

    The packed tensors are buffers that `model.to(...)` leaves alone (see _PackedLinear): only
    a bias is converted, and they never move off the CPU.

    Fusion: Int4Linear.concat([...]) packs several layers that read the same input (q/k/v,
    gate/up) into one along N, so one call quantizes the activations once and runs one
    threaded region; split the output with `y.split(module.out_splits, -1)`.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, backend: str):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.backend = backend
        self.out_splits: list[int] = [out_features]
        self.bias: torch.nn.Parameter | None = None
        self._isa: int | None = None  # x86 kernel's ISA code, None for other backends

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_neutral(cls, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, in_features: int,
                     bias: torch.Tensor | None = None, backend: str | None = None) -> "Int4Linear":
        N = qweight.shape[0]
        K = in_features
        G = 1 if group_size == 0 else -(-K // group_size)
        if qweight.dtype != torch.uint8 or tuple(qweight.shape) != (N, (K + 1) // 2):
            raise ValueError(f"qweight must be uint8 [N, ceil(K/2)] = [{N}, {(K + 1) // 2}], "
                             f"got {qweight.dtype} {tuple(qweight.shape)}")
        if tuple(scales.shape) != (N, G):
            raise ValueError(f"scales must be [N, n_groups] = [{N}, {G}], got {tuple(scales.shape)}")
        name = resolve_backend(backend)
        if name.startswith("x86") and not cls._x86_ok(group_size, K):
            name = "reference"
        if name == "arm-kleidiai" and not arm_module().is_supported():
            name = "reference"
        m = cls(K, N, group_size, name)
        m._set_weights(qweight.contiguous(), scales.float().contiguous())
        m._set_bias(bias)
        return m

    @staticmethod
    def _x86_ok(group_size: int, K: int) -> bool:
        # per channel the int32 accumulator holds 16 * 255 * 8 per k: K <= 65536 stays exact
        return (group_size % 8 == 0) and (group_size > 0 or K <= 65536)

    def _set_weights(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        self._isa = None
        if self.backend.startswith("x86"):
            self._keep_x86(*native.pack(qweight, scales, self.group_size, self.in_features))
        elif self.backend == "arm-kleidiai" and self._arm_pack(qweight, scales):
            pass
        else:
            self.backend = "reference"
            self._keep(qweight=qweight, scales=scales)

    def _keep_x86(self, w: torch.Tensor, sc: torch.Tensor, corr: torch.Tensor) -> None:
        self._keep(w=w, sc=sc, corr=corr)
        self._isa = native.isa_code(self.backend)

    def _arm_pack(self, qweight: torch.Tensor, scales: torch.Tensor) -> bool:
        try:
            packed = arm_module().pack(qweight, scales, self.group_size, self.in_features, self.out_features)
        except ValueError:  # a group size KleidiAI cannot take: the reference runs it
            return False
        self._keep(arm_packed=packed, qweight=qweight, scales=scales)
        return True

    @classmethod
    def concat(cls, layers: list["Int4Linear"], backend: str | None = None) -> "Int4Linear":
        """One layer computing all `layers` (same input size and group size) in one call."""
        if not layers:
            raise ValueError("concat needs at least one layer")
        K, gs = layers[0].in_features, layers[0].group_size
        if any(l.in_features != K or l.group_size != gs for l in layers):
            raise ValueError("concat needs equal in_features and group_size")
        biases = [l.bias if l.bias is not None else torch.zeros(l.out_features) for l in layers]
        bias = torch.cat(biases) if any(l.bias is not None for l in layers) else None
        backend = backend or layers[0].backend
        if cls._panels_concatenate(layers, backend):
            m = cls(K, sum(l.out_features for l in layers), gs, backend)
            sc_dtype = torch.float32 if len({l.sc.dtype for l in layers}) > 1 else layers[0].sc.dtype
            m._keep_x86(torch.cat([l.w for l in layers]), torch.cat([l.sc.to(sc_dtype) for l in layers]),
                        torch.cat([l.corr for l in layers]))
            m._set_bias(bias)
        else:
            parts = [l.neutral() for l in layers]
            m = cls.from_neutral(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), gs, K,
                                 bias=bias, backend=backend)
        m.out_splits = [l.out_features for l in layers]
        return m

    @staticmethod
    def _panels_concatenate(layers: list["Int4Linear"], backend: str) -> bool:
        """True when the x86 panels of `layers` can simply be stacked: same backend, and every
        layer but the last fills whole 16-column panels (no padding columns in between). No
        unpack/repack: the fused layer costs one copy of the packed bytes, not the ~4 bytes per
        weight of a neutral round trip (an 8B model's peak memory at load)."""
        return (backend.startswith("x86") and all(l.backend == backend for l in layers)
                and all(l.out_features % 16 == 0 for l in layers[:-1]))

    def neutral(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(qweight uint8 [N, ceil(K/2)], scales float32 [N, n_groups]) - the saved format."""
        if self.backend.startswith("x86"):
            return native.unpack(self.w, self.sc, self.group_size, self.in_features, self.out_features)
        return self.qweight, self.scales

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K, N = self.in_features, self.out_features
        if self._isa is not None and (x.dtype == torch.bfloat16 or x.dtype == torch.float32):
            # fast path (the common one): a single op call, little Python per call
            y = native.INT4_MM(x.reshape(-1, K), self.w, self.sc, self.corr, self.group_size, K, N, self._isa)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y.view(*x.shape[:-1], N)
        x2 = x.reshape(-1, K)
        if x2.dtype not in (torch.float32, torch.bfloat16):
            x2 = x2.float()
        if self._isa is not None:
            y = native.INT4_MM(x2, self.w, self.sc, self.corr, self.group_size, K, N, self._isa)
        elif self.backend == "arm-kleidiai":
            y = arm_module().matmul(x2, self.arm_packed, self.group_size, K, N).to(x2.dtype)
        else:
            y = int4_linear_reference(x2, self.qweight, self.scales, self.group_size, K)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], N).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, backend={self.backend}")


class Int8Linear(_PackedLinear):
    """Per-channel int8 weight (output heads, tied embeddings): y = x @ (q * s)^T (+ bias).

    Backends: the x86 VNNI kernel (activations quantized per row to int8 like Int4Linear,
    weights packed into 16-column panels, ~2x less traffic than bf16 F.linear); AVX2 (no VNNI)
    runs the same panels through block_mm as 8-bit codes u = q + 128 in one group per row
    (the same sums: S - 128 A = sum a q); else torch's `_weight_int8pack_mm` ("int8pack",
    weight-only int8, bf16 activations); "reference" dequantizes and runs F.linear. The
    neutral tensors are re-derived from the x86 layout.
    """

    def __init__(self, in_features: int, out_features: int, backend: str):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend
        self.bias: torch.nn.Parameter | None = None
        self._isa: int | None = None

    @classmethod
    def from_neutral(cls, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                     backend: str | None = None) -> "Int8Linear":
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ValueError("qweight must be int8 [N, K]")
        N, K = qweight.shape
        if scales.numel() != N:
            raise ValueError(f"scales must be [N] = [{N}]")
        if backend == "int8pack":
            name = "int8pack"
        else:
            name = resolve_backend(backend)
            if not (name.startswith("x86") or name == "reference") or K > 65536:
                name = "int8pack"
        if name == "int8pack" and K % 32:
            name = "reference"  # _weight_int8pack_mm (torch 2.13) returns inf or crashes unless K % 32 == 0
        m = cls(K, N, name)
        m._set_weights(qweight.contiguous(), scales.reshape(N).float().contiguous())
        m._set_bias(bias)
        return m

    @property
    def unsigned_codes(self) -> bool:
        """Whether the panels hold u = q + 128 for block_mm (AVX2) rather than q for int8_mm."""
        return self.backend == "x86-avx2"

    @property
    def code_group(self) -> int:
        """block_mm's group: the whole padded row."""
        return self.w.shape[1] * 4

    def _set_weights(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        self._isa = None
        if self.backend.startswith("x86"):
            w, sc, corr = native.pack_int8(qweight, scales)
            if self.unsigned_codes:  # block_mm needs no column correction
                self._keep(w=w ^ 0x80, sc=sc)
            else:
                self._keep(w=w, sc=sc, corr=corr)
            self._isa = native.isa_code(self.backend)
        elif self.backend == "int8pack":
            self._keep(qweight=qweight, scales=scales, scales_bf16=scales.to(torch.bfloat16))
        else:
            self._keep(qweight=qweight, scales=scales)

    def _saved_scales(self, scales: torch.Tensor) -> torch.Tensor:
        return scales.reshape(-1).float().contiguous()

    def neutral(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(qweight int8 [N, K], scales float32 [N])."""
        if self.backend.startswith("x86"):
            return native.unpack_int8(self._signed_panels(), self.sc, self.in_features, self.out_features)
        return self.qweight, self.scales

    def _signed_panels(self) -> torch.Tensor:
        return self.w ^ 0x80 if self.unsigned_codes else self.w

    def embed(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantized rows `ids` ([...] -> [..., K]): a tied embedding table can share this
        layer's weights instead of keeping a second copy."""
        flat = ids.reshape(-1).long()
        if self.backend.startswith("x86"):
            NP, K4, _ = self.w.shape
            rows = self.w.view(NP, K4, 16, 4)[flat // 16, :, flat % 16, :].reshape(flat.numel(), K4 * 4)
            rows = (rows ^ 0x80 if self.unsigned_codes else rows).view(torch.int8)[:, :self.in_features]
            scales = self.sc.reshape(-1)[flat]
        else:
            rows, scales = self.qweight[flat], self.scales[flat]
        out = rows.to(torch.float32) * scales[:, None]
        return out.to(dtype).reshape(*ids.shape, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.backend.startswith("x86"):
            if x2.dtype not in (torch.float32, torch.bfloat16):
                x2 = x2.float()
            if self.unsigned_codes:
                y = native.BLOCK_MM(x2, self.w, self.sc, self.sc[:0], 8, self.code_group, self.in_features,
                                    self.out_features, self._isa)
            else:
                y = native.INT8_MM(x2, self.w, self.sc, self.corr, self.in_features, self.out_features, self._isa)
        elif self.backend == "int8pack":
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self.scales_bf16)
        else:
            y = F.linear(x2.float(), self.qweight.float() * self.scales[:, None])
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"


class RescoredLinear(torch.nn.Module):
    """A wide linear layer whose largest outputs are the ones that matter (an output head):
    an int4 copy scores every output, then each row's `k` highest are recomputed from the exact
    table. A call reads the int4 copy (about half the int8 table's bytes) and k rows of the
    table, kept row-major so that a pick reads one row's bytes (in the x86 kernels' panels a
    row's bytes spread over 16 rows' lines). The outputs that decide greedy, top-k and top-p
    picks are the int8 kernels' (bit for bit on x86, where they come from the same quantized
    activations; elsewhere, and for a block table, the picked rows against the float
    activations), the rest carry int4 error.

    scan: Int4Linear or BlockLinear [N, K] without bias; exact: a layer [N, K] without bias that
    keeps its neutral rows (Int8Linear or BlockLinear of backend "reference", whose embed() a
    tied embedding reads); bias: [N] or None, added to every output.
    """

    def __init__(self, scan: torch.nn.Module, exact: torch.nn.Module, k: int, bias: torch.Tensor | None = None):
        super().__init__()
        if (scan.in_features, scan.out_features) != (exact.in_features, exact.out_features):
            raise ValueError("scan and exact layers must have the same shape")
        if scan.bias is not None or exact.bias is not None:
            raise ValueError("the bias belongs to RescoredLinear, not to its layers")
        if exact._isa is not None:
            raise ValueError("the exact table must keep its rows (backend 'reference'), not kernel panels")
        self.scan, self.exact = scan, exact
        # where the scan runs the x86 kernels, their ops rescore from the rows in one pass; the
        # reference elsewhere, through the table's embed() rows
        self._native = getattr(scan, "_isa", None) is not None
        self.in_features, self.out_features = exact.in_features, exact.out_features
        self.k = min(k, self.out_features)
        self.bias = _float_bias(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()  # (M, K)
        y = self.scan(x2)  # (M, N) float32
        e = self.exact
        if self._native and isinstance(e, Int8Linear):  # the int8 kernels' values
            a, sa = native.QUANT_ACT(x2, self.in_features)  # (M, K) uint8, (M,)
            y = native.RESCORE_TOP_K(y, a, sa, e.qweight, e.scales, self.k)
        elif self._native:  # a block table's picked rows against the float activations
            y = native.RESCORE_TOP_K_BLOCKS(y, x2, e.codes, e.scales, e.offsets, e.bits, e.group_size, self.k)
        else:
            y = rescore_top_k_reference(y, x2, self.exact.embed, self.k)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def exact_fraction_read(self) -> float:
        """The share of the exact table one row's call reads: its k picked rows."""
        return self.k / self.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}"
