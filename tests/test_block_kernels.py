"""BlockLinear (block-quantized weights: GGUF's formats as shipped) on every x86 ISA and the
reference backend, against the exact result of the integer group sums."""

from __future__ import annotations

import pytest
import torch

from llmrun.kernels import available_backends
from llmrun.kernels import native
from llmrun.kernels.block_linear import BlockLinear, block_linear_reference, quantize_activations_grouped
from llmrun.kernels.blocks import BlockWeight, concat_rows

BACKENDS = ["x86-avx512vnni", "x86-avxvnni", "x86-avx2", "reference"]
MS = [1, 2, 3, 4, 5, 7, 8, 17, 64]
# (bits, group, asymmetric): Q4_0 | Q4_1, Q4_K | Q5_0, Q8_0 | Q5_1, Q5_K | Q6_K, and g16 asymmetric
FORMATS = [(4, 32, False), (4, 32, True), (8, 32, False), (8, 32, True), (8, 16, False), (8, 16, True), (4, 64, True)]
# N not a multiple of the 16-column panel; K an odd number of groups, or not whole groups
SHAPES = [(37, 96), (16, 160), (53, 100), (5, 33)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param not in available_backends():
        pytest.skip(f"this CPU lacks {request.param}")
    return request.param


def random_blocks(N: int, K: int, bits: int, gs: int, asym: bool, seed: int, unit: bool = False) -> BlockWeight:
    """Random codes over the whole code range; fp16 scales and offsets (or ones and small integers)."""
    g = torch.Generator().manual_seed(seed)
    width = (K + 1) // 2 if bits == 4 else K
    codes = torch.randint(0, 256, (N, width), dtype=torch.uint8, generator=g)
    if bits == 4 and K % 2:
        codes[:, -1] = (codes[:, -1] & 0x0F) | 0x80  # an odd K's padding nibble is the zero code
    G = -(-K // gs)
    if unit:
        scales = torch.ones(N, G)
        offsets = torch.randint(-300, 300, (N, G), generator=g).float() if asym else None
    else:
        scales = (torch.randn(N, G, generator=g) * 0.02).half().float()
        offsets = (torch.randn(N, G, generator=g) * 0.1).half().float() if asym else None
    return BlockWeight(codes, bits, gs, scales, offsets, K)


def exact_and_tolerance(x: torch.Tensor, bw: BlockWeight):
    """The float64 result of the exact integer sums, and a bound on the kernel's float32
    rounding: per group one cvt, a product of scales and one or two FMAs, so (3G + 4) ulps of
    the sum of the terms' magnitudes (with |x|, |s| and |o| the reference sums exactly those)."""
    exact = block_linear_reference(x.float(), bw).double()
    absolute = BlockWeight(bw.codes, bw.bits, bw.group_size, bw.scales.abs(),
                           None if bw.offsets is None else bw.offsets.abs(), bw.in_features)
    mag = block_linear_reference(x.float().abs(), absolute).double()
    if bw.offsets is None:  # symmetric blocks subtract zero * A: its magnitude too
        a, sa = quantize_activations_grouped(x.float().abs(), bw.group_size)
        A = a.double().view(a.shape[0], -1, bw.group_size).sum(-1) * sa.double()  # (M, G)
        mag = mag + 2 * bw.zero * A @ bw.scales.double().abs().T
    G = bw.scales.shape[1]
    return exact, (3 * G + 4) * 2.0 ** -24 * mag + 2.0 ** -24 * exact.abs()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"b{f[0]}g{f[1]}{'a' if f[2] else 's'}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_block_linear_matches_exact_sums(backend, fmt, dtype):
    bits, gs, asym = fmt
    for N, K in SHAPES:
        bw = random_blocks(N, K, bits, gs, asym, seed=N * 1000 + K)
        mod = BlockLinear.from_blocks(bw, backend=backend)
        assert mod.backend == backend
        g = torch.Generator().manual_seed(K)
        for M in MS:
            x = (torch.randn(M, K, generator=g) * 3).to(dtype)
            y = mod(x)
            assert y.dtype == dtype and y.shape == (M, N)
            exact, tol = exact_and_tolerance(x, bw)
            if dtype == torch.bfloat16:
                tol = tol + exact.abs() * 2.0 ** -8
            err = (y.double() - exact).abs()
            assert bool((err <= tol).all()), f"max err {err.max()} ({backend} M={M} N={N} K={K} {fmt} {dtype})"


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"b{f[0]}g{f[1]}{'a' if f[2] else 's'}")
def test_block_linear_bitexact_with_integer_scales(backend, fmt):
    """Scales 1 and integer offsets keep every float step exact up to the activation scales
    (x = integers / 127 makes each group's s_a 1/127 or the group's max / 127): the output must
    equal the exact result to float32 rounding, so any error in an integer sum shows (one unit
    of a group sum moves the output by s_a, far more than that rounding)."""
    bits, gs, asym = fmt
    N, K = 37, 96
    bw = random_blocks(N, K, bits, gs, asym, seed=7, unit=True)
    mod = BlockLinear.from_blocks(bw, backend=backend)
    g = torch.Generator().manual_seed(1)
    for M in MS:
        x = torch.randint(-127, 128, (M, K), generator=g).float()
        x[:, ::gs] = 127  # every group's absmax 127: s_a = 1, a = x, all exact in float32
        assert torch.equal(mod(x), block_linear_reference(x, bw)), (backend, M)



@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_largest_group_sums_are_exact(backend, asym):
    """The largest sums a group can have (every code 15, every activation +127 or -127): a
    kernel that sums a group's products in narrower lanes than they need (AVX2 sums 4-bit
    groups in int16) would saturate or wrap here."""
    N, K = 37, 96
    bw = random_blocks(N, K, 4, 32, asym, seed=8, unit=True)
    bw.codes = torch.full_like(bw.codes, 0xFF)
    mod = BlockLinear.from_blocks(bw, backend=backend)
    for M in MS:
        x = torch.full((M, K), 127.0)
        x[1::2] = -127.0  # rows alternate the sign
        x[2::3, 32:64] *= -1  # and some groups flip theirs
        assert torch.equal(mod(x), block_linear_reference(x, bw)), (backend, M)

@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"b{f[0]}g{f[1]}{'a' if f[2] else 's'}")
def test_packed_layout_round_trips_exactly(backend, fmt):
    bits, gs, asym = fmt
    for N, K in SHAPES:
        bw = random_blocks(N, K, bits, gs, asym, seed=3)
        mod = BlockLinear.from_blocks(bw, backend=backend)
        back = mod.blocks()
        assert torch.equal(back.codes, bw.codes) and torch.equal(back.scales, bw.scales)
        assert (back.offsets is None) == (bw.offsets is None)
        if asym:
            assert torch.equal(back.offsets, bw.offsets)
        assert torch.equal(back.dequantize(), bw.dequantize())
        ids = torch.tensor([[N - 1, 0], [3 % N, N // 2]])
        assert torch.equal(mod.embed(ids), bw.dequantize()[ids])


def test_fp32_scales_are_kept_exactly(backend):
    """Scales that fp16 cannot hold (the K-quants' d * sc products) stay fp32."""
    bw = random_blocks(40, 128, 4, 32, True, seed=9)
    bw.scales = bw.scales * (1 + 2.0 ** -20)
    mod = BlockLinear.from_blocks(bw, backend=backend)
    assert torch.equal(mod.blocks().scales, bw.scales)
    x = torch.randn(5, 128)
    exact, tol = exact_and_tolerance(x, bw)
    assert bool(((mod(x).double() - exact).abs() <= tol).all())


def test_state_dict_round_trip(backend):
    bw = random_blocks(45, 96, 8, 16, True, seed=11)
    mod = BlockLinear.from_blocks(bw, bias=torch.randn(45), backend=backend)
    sd = mod.state_dict()
    assert set(sd) == {"codes", "scales", "offsets", "layout", "bias"}
    other = BlockLinear.from_blocks(random_blocks(45, 96, 4, 32, False, seed=12), backend=backend)
    other.load_state_dict(sd)
    x = torch.randn(3, 96)
    assert torch.equal(other(x), mod(x))


def test_mixed_formats_fuse_exactly(backend):
    """q/k/v of different formats (Gemma 3: Q5_0 q/k with a Q8_0 v; here also 4-bit asymmetric
    and g16 parts) fuse into one call whose weights are the parts' weights bit for bit."""
    parts = [random_blocks(48, 96, 8, 32, False, seed=1), random_blocks(16, 96, 8, 32, False, seed=2),
             random_blocks(21, 96, 4, 32, True, seed=3), random_blocks(16, 96, 8, 16, False, seed=4)]
    layers = [BlockLinear.from_blocks(p, backend=backend) for p in parts]
    fused = BlockLinear.concat(layers)
    assert fused.out_splits == [48, 16, 21, 16]
    assert torch.equal(fused.blocks().dequantize(), torch.cat([p.dequantize() for p in parts]))
    x = torch.randn(4, 96)
    whole = concat_rows(parts)
    exact, tol = exact_and_tolerance(x, whole)
    assert bool(((fused(x).double() - exact).abs() <= tol).all())
    # parts of one form stay in that form: their outputs are the separate layers', bit for bit
    same = BlockLinear.concat(layers[:2])
    assert same.bits == 8 and same.group_size == 32
    for y, layer in zip(same(x).split(same.out_splits, -1), layers[:2]):
        assert torch.equal(y, layer(x))


def test_widened_forms_are_exact():
    for bits, gs, asym in FORMATS:
        bw = random_blocks(19, 96, bits, gs, asym, seed=5)
        for to_bits, to_gs, to_asym in [(8, 16, True), (8, gs, asym), (8, 16, asym)]:
            if gs % to_gs or (asym and not to_asym):
                continue
            assert torch.equal(bw.widened(to_bits, to_gs, to_asym).dequantize(), bw.dequantize())


def test_activation_quantization_is_bit_exact():
    """block_mm's grouped activation quantization is the reference's, bit for bit: a weight row
    of unit scales whose only nonzero weight (code 129 in 8-bit symmetric: 1) sits at input k
    gives y = s_a,g * a[k], so both the codes and the scales show."""
    native.supported_isas()
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(9, 203, generator=g) * 5).to(dtype)
        x[3] = 0  # zero row
        x[4, 32:64] = 0  # zero group
        x[5, 7] = 300.0  # an outlier in one group
        a, sa = quantize_activations_grouped(x, 32)
        assert sa.shape == (9, 7) and bool((a[:, 203:] == 0).all())
        assert sa[5, 0] > 10 * sa[5, 1]  # the outlier costs its own group's precision only
        for k in (0, 40, 202):  # weight row e_k: y = s_a,g * a[k]
            codes = torch.full((1, 203), 128, dtype=torch.uint8)
            codes[0, k] = 129
            bw = BlockWeight(codes, 8, 32, torch.ones(1, 7), None, 203)
            for backend in [b for b in BACKENDS if b in available_backends()]:
                y = BlockLinear.from_blocks(bw, backend=backend)(x)
                assert torch.equal(y[:, 0], (sa[:, k // 32] * a[:, k].float()).to(dtype)), (backend, dtype, k)


def test_fusion_keeps_each_layers_bytes():
    """fuse_quantized fuses block layers of one code width and group size (symmetric beside
    asymmetric: explicit offsets, the same weights) and leaves other mixes apart rather than
    widening them (4-bit to 8-bit codes would double the bytes read)."""
    from llmrun.quant.transform import fuse_quantized

    q5_0 = BlockLinear.from_blocks(random_blocks(32, 96, 8, 32, False, seed=1))
    q8_0 = BlockLinear.from_blocks(random_blocks(16, 96, 8, 32, False, seed=2))
    q5_1 = BlockLinear.from_blocks(random_blocks(16, 96, 8, 32, True, seed=3))
    q4_k = BlockLinear.from_blocks(random_blocks(32, 96, 4, 32, True, seed=4))
    q6_k = BlockLinear.from_blocks(random_blocks(16, 96, 8, 16, False, seed=5))
    fused = fuse_quantized([q5_0, q8_0, q5_1])
    assert isinstance(fused, BlockLinear) and (fused.bits, fused.group_size) == (8, 32)
    assert torch.equal(fused.blocks().dequantize(),
                       torch.cat([m.blocks().dequantize() for m in (q5_0, q8_0, q5_1)]))
    assert fuse_quantized([q4_k, q4_k, q6_k]) is None
    assert fuse_quantized([q5_0, q6_k]) is None


@pytest.mark.parametrize("fmt", [(8, 32, False), (4, 32, True), (8, 16, True)], ids=["q8_0", "q4_1", "g16a"])
def test_rescored_head_over_a_block_table(fmt):
    """RescoredLinear with a block table (a GGUF's tied Q8_0 head, kept in its rows) rescores
    natively where the scan runs on x86: the picked outputs are the table's rows against the
    float activations (as the reference's embed() rows give them), the rest the scan's. Odd K
    (a partial last 4-byte word of a row: 4-bit codes of K = 97 take 49 bytes) included."""
    from llmrun.kernels import Int4Linear, RescoredLinear, quantize_int4
    from llmrun.kernels.reference import rescore_top_k_reference

    bits, gs, asym = fmt
    for K in (96, 97):
        bw = random_blocks(300, K, bits, gs, asym, seed=13)
        table = BlockLinear.from_blocks(bw, backend="reference")
        scan = Int4Linear.from_neutral(*quantize_int4(bw.dequantize(), 32), 32, K)
        head = RescoredLinear(scan, table, k=20)
        assert head._native == scan.backend.startswith("x86")
        for M in (1, 3):  # one row's picks split across threads; rows in parallel
            x = torch.randn(M, K, generator=torch.Generator().manual_seed(14))
            y, y4 = head(x), scan(x)
            ref = rescore_top_k_reference(y4, x, table.embed, 20)
            picked = ref != y4
            assert int(picked.sum()) == M * 20
            assert torch.equal(y[~picked], ref[~picked]), (K, M)
            torch.testing.assert_close(y[picked], ref[picked], rtol=1e-5, atol=1e-5)
