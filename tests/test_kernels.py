"""llmrun.kernels: every native ISA path against the integer-exact reference."""

from __future__ import annotations

import pytest
import torch

from llmrun.kernels import (
    Int4Linear,
    Int8Linear,
    RescoredLinear,
    available_backends,
    default_backend,
    dequantize_int4,
    int4_linear_reference,
    quantize_activations,
    quantize_int4,
    quantize_int8,
)
from llmrun.kernels import native
from llmrun.kernels.reference import int4_group_sums_reference

X86 = ["x86-avx512vnni", "x86-avxvnni", "x86-avx2"]
MS = [1, 2, 3, 4, 5, 7, 8, 17, 64]
GROUPS = [0, 32, 64, 128, 256]
# (N, K): N not a multiple of the 16-column panel; K a multiple of every group size, and K not
# a multiple of the larger group sizes (padded to whole groups) nor of 8 (odd nibble pair).
SHAPES = [(37, 256), (53, 96), (21, 100), (16, 77)]


def _backend_or_skip(name: str) -> str:
    if name not in available_backends():
        pytest.skip(f"this CPU lacks {name} (available: {available_backends()})")
    return name


@pytest.fixture(params=X86)
def isa(request, monkeypatch):
    name = _backend_or_skip(request.param)
    monkeypatch.setenv("LLMRUN_KERNEL_BACKEND", name)
    return name


def _exact_and_tolerance(x, qweight, scales, group_size, K):
    """The exact result (float64 from the int32 sums) and a float32 rounding bound for the
    kernel: it sums G terms s_a * scale * (S + 128 * qsum) (the +128 activation offset is
    removed after the sum), so the bound is (G + 4) ulps of the sum of their magnitudes."""
    _, (S, a, sa) = int4_linear_reference(x, qweight, scales, group_size, K, return_sums=True)
    ones = torch.ones(1, K, dtype=torch.int8)
    qsum = int4_group_sums_reference(ones, qweight, group_size, K)  # [1, N, G]
    sc = scales.double()[None]
    exact = (S.double() * sc).sum(-1) * sa.double()[:, None]
    mag = (sc.abs() * (S.double().abs() + 128 * qsum.double().abs())).sum(-1) * sa.double()[:, None]
    G = scales.shape[1]
    tol = (G + 4) * 2.0 ** -24 * mag + 2.0 ** -24 * exact.abs()
    return exact, tol, sa


_QUANTIZED: dict = {}


def _quantized(N, K, gs):
    """quantize_int4 of a fixed random matrix, computed once per (N, K, group size)."""
    key = (N, K, gs)
    if key not in _QUANTIZED:
        W = torch.randn(N, K, generator=torch.Generator().manual_seed(N * 1000 + K))
        _QUANTIZED[key] = quantize_int4(W, gs)
    return _QUANTIZED[key]


def _check(isa, N, K, gs, dtype):
    qweight, scales = _quantized(N, K, gs)
    mod = Int4Linear.from_neutral(qweight, scales, gs, K, backend=isa)
    assert mod.backend == isa
    g = torch.Generator().manual_seed(K)
    for M in MS:
        x = (torch.randn(M, K, generator=g) * 3).to(dtype)
        y = mod(x)
        assert y.dtype == dtype and y.shape == (M, N)
        exact, tol, sa = _exact_and_tolerance(x, qweight, scales, gs, K)
        if dtype == torch.bfloat16:
            tol = tol + exact.abs() * 2.0 ** -8  # rounding of the bf16 output
        err = (y.double() - exact).abs()
        assert bool((err <= tol).all()), f"max err {err.max()} ({isa} M={M} N={N} K={K} g={gs} {dtype})"
        if dtype == torch.float32:
            # one unit of any int32 group sum is far above the tolerance, so integer errors show
            unit = sa.double()[:, None] * scales.double().abs().min(-1).values[None]
            assert bool((tol < 0.25 * unit).all())


@pytest.mark.parametrize("gs", GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_native_matches_reference(isa, gs, dtype):
    """M in MS x every shape in SHAPES, against the exact result of the int32 group sums."""
    for N, K in SHAPES:
        _check(isa, N, K, gs, dtype)


@pytest.mark.parametrize("gs", GROUPS)
def test_native_bitexact_with_unit_scales(isa, gs):
    """With all scales 1 every float step of the kernel is exact, so its output must equal
    s_a * (int32 sum) bit for bit: the int32 sums are identical to the reference's."""
    N, K = 37, 256
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    from llmrun.kernels.reference import pack_int4

    qweight = pack_int4(q)
    G = 1 if gs == 0 else K // gs
    scales = torch.ones(N, G)
    mod = Int4Linear.from_neutral(qweight, scales, gs, K, backend=isa)
    for M in MS:
        x = torch.randn(M, K, generator=g)
        y = mod(x)
        y_ref, (S, a, sa) = int4_linear_reference(x, qweight, scales, gs, K, return_sums=True)
        assert torch.equal(y, S.sum(-1).float() * sa[:, None])
        assert torch.equal(y, y_ref)


def test_activation_quantization_is_bit_exact():
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(9, 203, generator=g) * 5).to(dtype)
        x[3] = 0  # zero row
        a_ref, sa_ref = quantize_activations(x)
        native.supported_isas()
        a, sa = torch.ops.llmrun.quant_act(x, 208)
        assert torch.equal(a[:, :203].to(torch.int16) - 128, a_ref.to(torch.int16))
        assert bool((a[:, 203:] == 128).all())
        assert torch.equal(sa, sa_ref)


def test_group_sums_reference_is_exact():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(5, 70, generator=g)
    qweight, scales = quantize_int4(W, 32)
    a = torch.randint(-127, 128, (3, 70), generator=g, dtype=torch.int8)
    S = int4_group_sums_reference(a, qweight, 32, 70)
    from llmrun.kernels.reference import unpack_int4

    q = unpack_int4(qweight, 70).long()
    for gi, (k0, k1) in enumerate([(0, 32), (32, 64), (64, 70)]):
        assert torch.equal(S[:, :, gi].long(), a[:, k0:k1].long() @ q[:, k0:k1].T)


@pytest.mark.parametrize("gs", GROUPS)
def test_quantize_int4_round_trip(gs):
    g = torch.Generator().manual_seed(4)
    N, K = 48, 333
    W = torch.randn(N, K, generator=g)
    qweight, scales = quantize_int4(W, gs)
    assert qweight.dtype == torch.uint8 and qweight.shape == (N, (K + 1) // 2)
    G = 1 if gs == 0 else -(-K // gs)
    assert scales.dtype == torch.float32 and scales.shape == (N, G)
    assert torch.equal(scales.half().float(), scales)  # fp16-representable
    assert bool(((qweight >> 4)[:, -1] == 8).all())  # odd K: padded nibble is q = 0
    Wd = dequantize_int4(qweight, scales, gs, K)
    rel = ((Wd - W) ** 2).mean() / (W ** 2).mean()
    # Gaussian weights: ~0.011 at g32, ~0.045 per channel (absmax/7 gives ~0.08 per channel)
    assert rel < {0: 0.06, 32: 0.015, 64: 0.02, 128: 0.025, 256: 0.03}[gs], rel
    # each element is within half a step of its group's scale, or clamped at the ends
    step = scales.abs().repeat_interleave(K if gs == 0 else gs, 1)[:, :K]
    assert bool(((Wd - W).abs() <= 0.5 * step + 1e-6).float().mean() > 0.98)


def test_quantize_int8_round_trip():
    W = torch.randn(64, 100, generator=torch.Generator().manual_seed(5))
    q, s = quantize_int8(W)
    assert q.dtype == torch.int8 and s.shape == (64,)
    assert bool(((q.float() * s[:, None] - W).abs() <= s[:, None] / 2 + 1e-6).all())


@pytest.mark.parametrize("gs", [0, 32])
def test_pack_unpack_round_trip_and_state_dict(gs):
    name = default_backend()
    W = torch.randn(45, 136, generator=torch.Generator().manual_seed(6))
    qweight, scales = quantize_int4(W, gs)
    mod = Int4Linear.from_neutral(qweight, scales, gs, 136, backend=name)
    q2, s2 = mod.neutral()
    assert torch.equal(q2, qweight) and torch.equal(s2, scales)
    sd = mod.state_dict()
    assert set(sd) == {"qweight", "scales"}
    other = Int4Linear.from_neutral(torch.full_like(qweight, 8), torch.ones_like(scales), gs, 136, backend=name)
    other.load_state_dict(sd)
    x = torch.randn(3, 136)
    assert torch.equal(other(x), mod(x))


def test_non_fp16_scales_use_fp32_path():
    name = default_backend()
    g = torch.Generator().manual_seed(7)
    qweight, _ = quantize_int4(torch.randn(40, 128, generator=g), 32)
    scales = torch.rand(40, 4, generator=g) + 0.1  # not fp16-representable
    mod = Int4Linear.from_neutral(qweight, scales, 32, 128, backend=name)
    x = torch.randn(5, 128, generator=g)
    ref = int4_linear_reference(x, qweight, scales, 32, 128)
    torch.testing.assert_close(mod(x), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(mod.neutral()[1], scales)


@pytest.mark.parametrize("sizes", [(24, 8, 8), (32, 16, 20)])  # repacked / panels stacked
@pytest.mark.parametrize("group_size", [0, 32])
def test_concat_fuses_layers(sizes, group_size):
    name = default_backend()
    g = torch.Generator().manual_seed(8)
    neutral = [quantize_int4(torch.randn(n, 96, generator=g), group_size) for n in sizes]
    neutral[1] = (neutral[1][0], neutral[1][1] * 1.0001)  # scales fp16 cannot hold: fp32 panels
    biases = [None, torch.randn(sizes[1], generator=g), None]  # one biased layer: zeros for the rest
    layers = [Int4Linear.from_neutral(q, s, group_size, 96, bias=b, backend=name) for (q, s), b in zip(neutral, biases)]
    fused = Int4Linear.concat(layers)
    x = torch.randn(4, 96, generator=g)
    parts = fused(x).split(fused.out_splits, -1)
    for layer, part in zip(layers, parts):
        torch.testing.assert_close(part, layer(x), rtol=1e-6, atol=1e-6)
    q, s = fused.neutral()
    assert torch.equal(q, torch.cat([n[0] for n in neutral]))
    assert torch.equal(s, torch.cat([n[1] for n in neutral]).float())


def test_bias_and_leading_dims():
    name = default_backend()
    g = torch.Generator().manual_seed(9)
    qweight, scales = quantize_int4(torch.randn(20, 64, generator=g), 32)
    bias = torch.randn(20, generator=g)
    mod = Int4Linear.from_neutral(qweight, scales, 32, 64, bias=bias, backend=name)
    x = torch.randn(2, 3, 64, generator=g)
    ref = int4_linear_reference(x.reshape(6, 64), qweight, scales, 32, 64).reshape(2, 3, 20) + bias
    torch.testing.assert_close(mod(x), ref, rtol=1e-5, atol=1e-5)
    # a model cast to bf16 converts the bias only, never the packed scales
    mod.to(torch.bfloat16)
    y = mod(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())
    assert torch.equal(mod.neutral()[1], scales)
    # packed tensors are named (compiled packages are fed them by name), never saved as such
    assert dict(mod.named_buffers()) and all(b.dtype != torch.bfloat16 for b in mod.buffers())
    assert set(mod.state_dict()) == {"qweight", "scales", "bias"}


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("LLMRUN_KERNEL_BACKEND", "reference")
    assert default_backend() == "reference"
    qweight, scales = quantize_int4(torch.randn(8, 32), 32)
    assert Int4Linear.from_neutral(qweight, scales, 32, 32).backend == "reference"
    monkeypatch.setenv("LLMRUN_KERNEL_BACKEND", "no-such-backend")
    from llmrun.errors import LlmrunError

    with pytest.raises(LlmrunError):
        default_backend()


@pytest.mark.parametrize("gs", [0, 32])
def test_torch_compile_fullgraph_no_graph_breaks(gs):
    import torch._dynamo

    name = default_backend()
    g = torch.Generator().manual_seed(10)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = Int4Linear.from_neutral(*quantize_int4(torch.randn(64, 96, generator=g), gs), gs, 96,
                                              backend=name)
            self.down = Int4Linear.from_neutral(*quantize_int4(torch.randn(96, 64, generator=g), gs), gs, 64,
                                                backend=name)

        def forward(self, x):
            return x + self.down(torch.nn.functional.silu(self.up(x)))

    block = Block()
    x = torch.randn(1, 5, 96, generator=g)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(block, fullgraph=True)
    y = compiled(x)
    assert not torch._dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(y, block(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["x86-avx512vnni", "x86-avxvnni", "x86-avx2", "int8pack", "reference"])
def test_int8_linear(name):
    if name.startswith("x86"):
        _backend_or_skip(name)
    g = torch.Generator().manual_seed(11)
    for N, K in [(300, 64), (37, 100), (16, 7), (4113, 40)]:  # 4113 rows: packed in slices of 4096
        W = torch.randn(N, K, generator=g)
        q, s = quantize_int8(W)
        mod = Int8Linear.from_neutral(q, s, backend=name)
        assert mod.backend == (name if name != "int8pack" or K % 32 == 0 else "reference")
        q2, s2 = mod.neutral()
        assert torch.equal(q2, q) and torch.equal(s2, s)
        ids = torch.tensor([[0, N - 1], [N // 2, 3 % N]])
        assert torch.equal(mod.embed(ids), (q.float() * s[:, None])[ids])
        sd = mod.state_dict()
        assert set(sd) == {"qweight", "scales"} and torch.equal(sd["qweight"], q)
        for M in (1, 2, 5, 17):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(M, K, generator=g).to(dtype)
                y = mod(x)
                assert y.dtype == dtype and y.shape == (M, N)
                if name.startswith("x86"):
                    # integer-exact: int32 dot products of the per-row int8 activations
                    a, sa = quantize_activations(x)
                    exact = (a.double() @ q.double().T) * s.double() * sa.double()[:, None]
                    mag = (a.double().abs() + 128) @ q.double().abs().T * s.double() * sa.double()[:, None]
                    tol = 4 * 2.0 ** -24 * mag + (2.0 ** -8 * exact.abs() if dtype == torch.bfloat16 else 0)
                    assert bool(((y.double() - exact).abs() <= tol).all())
                else:
                    ref = x.float() @ (q.float() * s[:, None]).T
                    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("name", ["x86-avx512vnni", "x86-avx2", "reference"])
def test_rescored_linear_recomputes_each_rows_top_k(name):
    """RescoredLinear: each row's k largest int4 outputs, recomputed from the int8 table's rows,
    are the int8 kernel's (bit for bit on every x86 ISA, AVX2's block_mm panels included;
    x . (q8 * s8) from float activations elsewhere), every other output is the int4 layer's
    own (+ bias). A table in kernel panels is refused."""
    if name.startswith("x86"):
        _backend_or_skip(name)
    g = torch.Generator().manual_seed(5)
    for N, K, k in [(4113, 77, 64), (37, 100, 64), (300, 64, 1)]:  # k > N: every output
        W = torch.randn(N, K, generator=g)
        q8, s8 = quantize_int8(W)
        q4, s4 = quantize_int4(W, 32)
        scan = Int4Linear.from_neutral(q4, s4, 32, K, backend=name)
        exact = Int8Linear.from_neutral(q8, s8, backend=name)  # the int8 kernel's values
        bias = torch.randn(N, generator=g)
        mod = RescoredLinear(scan, Int8Linear.from_neutral(q8, s8, backend="reference"), k, bias)
        assert mod.exact_fraction_read() == min(k, N) / N
        if name.startswith("x86"):
            with pytest.raises(ValueError, match="keep its rows"):
                RescoredLinear(scan, exact, k)
        int8_values = name.startswith("x86")
        w8 = q8.double() * s8.double()[:, None]
        for M in (1, 3, 17):
            x = torch.randn(M, K, generator=g)
            y, y4 = mod(x), scan(x)
            picked = torch.zeros(M, N, dtype=torch.bool).scatter_(-1, y4.topk(min(k, N), -1).indices, True)
            if int8_values:
                assert torch.equal(y, torch.where(picked, exact(x), y4) + bias), (N, K, k, M)
            else:
                want = torch.where(picked, x.double() @ w8.T, y4.double()) + bias.double()
                tol = 1e-5 * (x.double().abs() @ w8.abs().T) + 1e-6 * want.abs()
                assert bool(((y.double() - want).abs() <= tol).all()), (N, K, k, M)
        x = torch.randn(2, 3, K, generator=g).bfloat16()  # leading dims, bf16 activations
        y = mod(x)
        assert y.shape == (2, 3, N) and y.dtype == torch.bfloat16
        torch.testing.assert_close(y, mod(x.reshape(6, K)).reshape(2, 3, N))


@pytest.fixture(params=[2, 1, 0], ids=["avx512", "avx2", "baseline"])
def attention_isa(request):
    """Runs a test under each body of the attention ops this CPU can run (AVX512, AVX2, baseline)."""
    from llmrun.kernels.attention import cache_attention_available

    if not cache_attention_available() or not native.built():
        pytest.skip("the native kernel is not in use on this machine")
    if request.param == 1 and "x86-avx2" in native.supported_isas():
        native.load_bodies("x86-avx2")  # AVX2's attention bodies: built on demand beside AVX512's
    if torch.ops.llmrun.set_attention_isa(request.param) != request.param:
        torch.ops.llmrun.set_attention_isa(2)
        pytest.skip("this CPU lacks the ISA")
    yield request.param
    torch.ops.llmrun.set_attention_isa(2)


def _slotted_cache(B: int, Hkv: int, S: int, D: int, dtype, g, spread: float = 2.0):
    """k, v of B + 1 slots and the slots rows 0..B-1 use (B, B-1, ..., 1): slot 0, which no
    row uses, is all NaN, so reading it would show."""
    k = (torch.randn(B + 1, Hkv, S, D, generator=g) * spread).to(dtype)
    v = torch.randn(B + 1, Hkv, S, D, generator=g).to(dtype)
    k[0], v[0] = float("nan"), float("nan")
    return k, v, list(range(B, 0, -1))


def _garbage_past(k, v, slots, last):
    """k, v with NaN / inf past each row's last position in its slot (positions never read)."""
    kg, vg = k.clone(), v.clone()
    for slot, p in zip(slots, last):
        kg[slot, :, p + 1:] = float("nan")
        vg[slot, :, p + 1:] = float("inf")
    return kg, vg


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("shape", [(1, 6, 2, 37, 40), (2, 4, 1, 20, 256), (1, 3, 3, 9, 8), (3, 6, 2, 33, 24),
                                   (2, 4, 2, 23, 36), (3, 14, 2, 45, 64), (2, 16, 2, 19, 16)])
# B, H, Hkv, S, D (36: not whole 8-lane vectors; 7 and 8 query heads per kv head: passes over
# k and v serve up to 4 of them)
def test_decode_attention_matches_reference(dtypes, shape, attention_isa):
    """Each row over its own slot at its own position (rows at different lengths in one call)."""
    from llmrun.kernels.attention import decode_attention, decode_attention_reference

    op = decode_attention
    q_dtype, kv_dtype = dtypes
    B, H, Hkv, S, D = shape
    g = torch.Generator().manual_seed(S * D)
    q = torch.randn(B, H, 1, D, generator=g).to(q_dtype)
    k, v, slots = _slotted_cache(B, Hkv, S, D, kv_dtype, g)
    tol = 1e-5 if q_dtype == torch.float32 else 2e-2
    for pos in (0, S // 2, S - 1):
        positions = [max(0, pos - 4 * b) for b in range(B)]  # row b four positions behind row b - 1
        kg, vg = _garbage_past(k, v, slots, positions)
        for softcap, window in ((0.0, 0), (0.0, 5), (20.0, 0), (20.0, 3)):
            got = op(q, kg, vg, torch.tensor(positions), torch.tensor(slots), 0.3, softcap, window)
            ref = decode_attention_reference(q, k, v, positions, slots, 0.3, softcap, window)
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    # positions past each row's own are never read: garbage there changes nothing; (B, 1) positions too
    positions = [S // 2 - b for b in range(B)]
    kg, vg = _garbage_past(k, v, slots, positions)
    pos, sl = torch.tensor(positions), torch.tensor(slots)
    assert torch.equal(op(q, kg, vg, pos[:, None], sl, 0.3, 0.0, 0), op(q, k, v, pos, sl, 0.3, 0.0, 0))
    # a row's output is the same bits alone as beside the others, at any thread count
    together = op(q, k, v, pos, sl, 0.3, 20.0, 0)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 3):
            torch.set_num_threads(n_threads)
            for b in range(B):
                alone = op(q[b:b + 1], k, v, pos[b:b + 1], sl[b:b + 1], 0.3, 20.0, 0)
                assert torch.equal(alone, together[b:b + 1])
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match="outside the cache of"):
        op(q, k, v, torch.full((B,), S), sl, 0.3, 0.0, 0)
    with pytest.raises(RuntimeError, match="slot .* outside the cache"):
        op(q, k, v, pos, torch.full((B,), B + 1), 0.3, 0.0, 0)


def _prefill_rows(positions: list[int], B: int) -> list[list[int]]:
    """Row b's query positions: `positions` moved back by 3 b (at least 0): rows at different
    lengths in one call."""
    return [[max(0, p - 3 * b) for p in positions] for b in range(B)]


PREFILL_POSITIONS = (  # of row 0, over a cache of S positions
    # a first chunk, a later chunk (several blocks of queries, the last one partial; several
    # slices of positions, some seen whole by every query of a block), one query at the
    # cache's end, two that differ in seeing the last position, a block whose first query sits
    # one before the end of the kernel's first slice (128 positions) and positions out of order
    lambda S: list(range(S - 3)), lambda S: list(range(5, S)), lambda S: [S - 1], lambda S: [S - 2, S - 1],
    lambda S: list(range(126, S)) or [0], lambda S: [3, 0, S - 1, 2, 1],
)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.bfloat16, torch.bfloat16)], ids=["fp32", "fp32-bf16cache", "bf16"])
@pytest.mark.parametrize("shape", [(1, 6, 2, 170, 40), (2, 4, 1, 80, 256), (1, 3, 3, 9, 8), (1, 10, 2, 300, 64),
                                   (2, 16, 2, 40, 1), (3, 6, 3, 140, 32)])
def test_prefill_attention_matches_reference(dtypes, shape, attention_isa):  # shape: B, H, Hkv, S, D
    from llmrun.kernels.attention import prefill_attention, prefill_attention_reference

    dtype, kv_dtype = dtypes
    B, H, Hkv, S, D = shape
    g = torch.Generator().manual_seed(S * D)
    k, v, slots = _slotted_cache(B, Hkv, S, D, kv_dtype, g)
    sl = torch.tensor(slots)
    tol = 3e-5 if dtype == torch.float32 else 2e-2  # fp32: sums of up to 256 products of scores ~10
    for make in PREFILL_POSITIONS:
        rows = _prefill_rows(make(S), B)
        q = torch.randn(B, H, len(rows[0]), D, generator=g).to(dtype)
        kg, vg = _garbage_past(k, v, slots, [max(r) for r in rows])
        for window in (0, 1, 7, 70):
            got = prefill_attention(q, kg, vg, torch.tensor(rows), sl, 0.3, window)
            ref = prefill_attention_reference(q, k, v, rows, slots, 0.3, window)
            torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    # and garbage there changes nothing at all
    rows = _prefill_rows(list(range(S // 2)), B)
    q = torch.randn(B, H, S // 2, D, generator=g).to(dtype)
    kg, vg = _garbage_past(k, v, slots, [max(r) for r in rows])
    pos = torch.tensor(rows)
    assert torch.equal(prefill_attention(q, kg, vg, pos, sl, 0.3, 0), prefill_attention(q, k, v, pos, sl, 0.3, 0))
    with pytest.raises(RuntimeError, match="outside the cache of"):
        prefill_attention(q[:, :, :1], k, v, torch.full((B, 1), S), sl, 0.3, 0)
    with pytest.raises(RuntimeError, match="input_pos must be"):
        prefill_attention(q, k, v, pos[0], sl, 0.3, 0)
    if dtype != kv_dtype:  # the one mix the op does not take: a bf16 q over an fp32 cache
        with pytest.raises(RuntimeError, match="a bf16 q needs a bf16 cache"):
            prefill_attention(q.bfloat16(), k.float(), v.float(), pos, sl, 0.3, 0)


@pytest.mark.parametrize("shape", [(1, 6, 2, 170, 40), (2, 4, 1, 80, 256), (1, 3, 3, 9, 8), (1, 10, 2, 300, 64),
                                   (2, 16, 2, 40, 1), (3, 6, 3, 140, 32)])
def test_prefill_attention_bf16_dots(shape, attention_isa):  # shape: B, H, Hkv, S, D
    """bf16_dots against its emulation (operands and weights rounded to bf16, float64 sums):
    within one bf16 step of every weight (at most 2^-7 of it), that is 2^-7 sum_i w_i |v_i| / l
    per output. A weight may round the other way than the emulation's where its score (summed
    in fp32, not exactly) sits at a rounding boundary, or where the kernel rounded it against a
    running max (rows that see more than one slice of 128 positions). Exactly the fp32 op where
    the CPU or ISA cannot."""
    from llmrun.kernels.attention import (bf16_dots_available, prefill_attention, prefill_attention_bf16_reference,
                                          prefill_attention_reference)

    B, H, Hkv, S, D = shape
    g = torch.Generator().manual_seed(S * D)
    k, v, slots = _slotted_cache(B, Hkv, S, D, torch.float32, g)
    sl = torch.tensor(slots)
    for make in PREFILL_POSITIONS:
        rows = _prefill_rows(make(S), B)
        q = torch.randn(B, H, len(rows[0]), D, generator=g)
        kg, vg = _garbage_past(k, v, slots, [max(r) for r in rows])
        for window in (0, 1, 7, 70):
            pos = torch.tensor(rows)
            got = prefill_attention(q, kg, vg, pos, sl, 0.3, window, bf16_dots=True)
            if not bf16_dots_available():
                assert torch.equal(got, prefill_attention(q, k, v, pos, sl, 0.3, window))
                continue
            ref = prefill_attention_bf16_reference(q, k, v, rows, slots, 0.3, window)
            step = prefill_attention_bf16_reference(q, k, v.abs(), rows, slots, 0.3, window) * 2.0 ** -7
            assert bool(((got - ref).abs() <= step + 1e-5).all()), ((got - ref).abs().max(), window)
            if window != 1:  # and bf16 did run: fp32 sums of exact products would sit within 3e-5
                exact = prefill_attention_reference(q, k, v, rows, slots, 0.3, window)
                assert (got - exact).abs().max() > 1e-4
    # bf16 operands take the bf16 op whatever the flag
    qb, kb, vb = (torch.randn(B, n, S, D, generator=g).bfloat16() for n in (H, Hkv, Hkv))
    pos, sl = torch.arange(S).expand(B, S), torch.arange(B)
    assert torch.equal(prefill_attention(qb, kb, vb, pos, sl, 0.3, 0, bf16_dots=True),
                       prefill_attention(qb, kb, vb, pos, sl, 0.3, 0))


@pytest.mark.parametrize("op", ["llmrun-g32", "llmrun-int8"])
def test_kernel_bench_weight_copies_are_distinct(op):
    """The kernel bench cycles weight copies so that M=1 reads DRAM: each must own its packed
    tensors (shared ones would be read from cache and inflate the GB/s)."""
    from llmrun.kernels import bench

    fns = bench._make(op, 32, 64, 1, 3, torch.Generator().manual_seed(0))
    modules = [f.__defaults__[0] for f in fns]
    assert len({m.w.data_ptr() for m in modules}) == 3
    assert all(torch.equal(m(torch.ones(1, 64)), modules[0](torch.ones(1, 64))) for m in modules)


def test_backends_known_before_the_extension_loads_and_first_call_loads_it():
    """A fresh process names this CPU's ISAs from its flags without loading the extension (a
    model is packed while it builds), the same ones the extension reports, and an op's first
    call loads it."""
    import subprocess
    import sys

    if not native.supported_isas():
        pytest.skip("the native kernel is not in use on this machine")
    code = (
        "import torch\n"
        "from llmrun.kernels import native\n"
        "early = native.runnable_isas()\n"
        "assert 'ok' not in native._state, 'runnable_isas loaded the extension'\n"
        "a, sa = native.QUANT_ACT(torch.ones(2, 8), 8)\n"
        "assert native._state['ok'] and a.shape == (2, 8)\n"
        "assert early == native.supported_isas(), (early, native.supported_isas())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_a_cpu_with_avx2_alone_builds_and_runs_only_the_avx2_bodies(tmp_path):
    """What an AVX2-only CPU gets (its flags simulated here, in a fresh cache): the ops' library
    with the AVX2 body set alone, the x86-avx2 backend by default, and its matmul and attention
    (AVX2 bodies, not this CPU's AVX512 ones) equal to the reference."""
    import os
    import subprocess
    import sys

    if "x86-avx2" not in native.supported_isas():
        pytest.skip("this CPU lacks AVX2")
    code = (
        "import torch\n"
        "from llmrun.kernels import native, dispatch\n"
        "from llmrun.kernels.modules import Int4Linear\n"
        "from llmrun.kernels.attention import decode_attention, cache_attention_available\n"
        "from llmrun.kernels.reference import quantize_int4\n"
        "native._cpu_flags = lambda: 'flags\\t\\t: fpu sse2 avx avx2 fma f16c'\n"
        "assert native._default_sets() == ('avx2',), native._default_sets()\n"
        "assert dispatch.default_backend() == 'x86-avx2'\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, s = quantize_int4(torch.randn(40, 96, generator=g), 32)\n"
        "mod = Int4Linear.from_neutral(q, s, 32, 96)\n"
        "ref = Int4Linear.from_neutral(q, s, 32, 96, backend='reference')\n"
        "x = torch.randn(5, 96, generator=g)\n"
        "assert mod.backend == 'x86-avx2'\n"
        "torch.testing.assert_close(mod(x), ref(x), rtol=1e-5, atol=1e-5)\n"
        "assert cache_attention_available() and torch.ops.llmrun.set_attention_isa(2) == 1\n"
        "qq, k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)\n"
        "out = decode_attention(qq, k, v, torch.tensor([5]), torch.tensor([0]), 0.25)\n"
        "want = torch.softmax((qq @ k[:, :, :6].transpose(-1, -2)) * 0.25, -1) @ v[:, :, :6]\n"
        "torch.testing.assert_close(out, want)\n"
        "assert native._state['sets'] == {'avx2'}, native._state\n"
    )
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    env.pop("LLMRUN_KERNEL_BACKEND", None)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600, env=env)
