"""llmrun.kernels.arm: argument construction for torch's KleidiAI int4 ops.

On x86 (and on an Arm CPU without KleidiAI) the ATen ops run torch's scalar reference, which
checks that our weights, scales, block sizes and dtypes are what the op expects. On aarch64
with KleidiAI (run scripts/test-aarch64.sh for that under emulation) the same tests also
check that the packing really took KleidiAI's layout, not the silent reference fallback.
Set LLMRUN_REQUIRE_KLEIDIAI=1 to fail, rather than test the reference, when it is absent.
"""

from __future__ import annotations

import math
import os
import platform

import pytest
import torch

from llmrun.kernels import arm, dequantize_int4, int4_linear_reference

ON_ARM = platform.machine().lower() in ("aarch64", "arm64")
KLEIDIAI = ON_ARM and torch.backends.kleidiai.is_available()

GROUPS = [0, 32, 64, 128, 256]
MS = [1, 3, 17]
K = 512
N = 52  # neither a multiple of 16 nor of KleidiAI's nr = 8
# (M, N) shapes: odd M with that odd N, and one aligned shape (M % 8 == 0, N % 16 == 0) on
# which torch picks KleidiAI's I8MM GEMM kernels and splits N over threads.
SHAPES = [(m, N) for m in MS] + [(16, 64)]


def _random_int4(N, K, group_size, seed):
    """Neutral int4 weights: (q int8 [N, K], qweight uint8 [N, ceil(K/2)], scales [N, G])."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (N, K), generator=gen, dtype=torch.int8)
    n_groups = 1 if group_size == 0 else -(-K // group_size)
    # signed scales: llmrun's quantizer keeps the sign that reaches the lone -8 level
    scales = (torch.rand(N, n_groups, generator=gen) * 0.02 + 0.001) * (
        torch.randint(0, 2, (N, n_groups), generator=gen) * 2 - 1
    )
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if K % 2:  # the neutral format pads odd K with u = 8 (q = 0)
        u = torch.cat([u, torch.full((N, 1), 8, dtype=torch.uint8)], dim=1)
    return q, u[:, 0::2] | (u[:, 1::2] << 4), scales


def _random_x(M, K, seed):
    gen = torch.Generator().manual_seed(seed)
    # Skewed rows (like activations after SiLU) exercise the asymmetric zero point.
    return torch.randn(M, K, generator=gen) + torch.rand(M, 1, generator=gen)


def _kernel_scales(scales, group_size, K):
    """The scales the op multiplies with: group-wise ones are stored as bf16."""
    if group_size == 0 or group_size >= K:
        return scales.float()
    return scales.to(torch.bfloat16).float()


def _dequantized_reference(x, qweight, scales, group_size, K):
    """fp32 x @ W.T with W dequantized from the neutral format: no activation rounding."""
    return x.float() @ dequantize_int4(qweight, scales, group_size, K).T


def _act_step(x):
    """One int8 step of KleidiAI's per-row asymmetric quantization: range / 255."""
    rng = x.clamp(min=0).amax(dim=1) - x.clamp(max=0).amin(dim=1)
    return (rng / 255.0).unsqueeze(1)  # (M, 1)


def _fake_quant_rows(x):
    """KleidiAI's qai8dx quantize + dequantize of each row (lhs_quant_pack_qai8dxp_f32)."""
    x = x.float()
    rmin = x.amin(dim=1, keepdim=True).clamp(max=0)
    rmax = x.amax(dim=1, keepdim=True).clamp(min=0)
    scale = torch.where(rmax == rmin, torch.ones_like(rmax), 255.0 / (rmax - rmin))
    lo, hi = rmin * scale, rmax * scale
    zp = torch.where((-128 + lo) + (127 + hi) > 0, -128 - lo, 127 - hi).clamp(-128, 127).round()
    a = (torch.round(x * scale) + zp).clamp(-128, 127)
    return (a - zp) / scale


def _packed_size_reference_layout(N, K, group_size):
    n_groups = 1 if group_size in (0, K) else K // group_size
    return N * K // 2 + N * n_groups


def _kleidiai_packed_size(N, K, group_size):
    """KleidiAI's packed size as torch's meta kernel computes it (private, torch >= 2.6)."""
    from torch._meta_registrations import get_kai_packed_weight_size

    return int(get_kai_packed_weight_size(4, N, K, K if group_size == 0 else group_size))


def _check_against_references(y, x, qweight, scales, group_size, K):
    """y = arm.matmul(x, ...) agrees with the dequantized, the fake-quantized and llmrun's
    integer reference within what int8 activation quantization explains."""
    M, N = y.shape
    w_scales = _kernel_scales(scales, group_size, K)
    w = dequantize_int4(qweight, w_scales, group_size, K)  # (N, K)
    ref = _dequantized_reference(x, qweight, w_scales, group_size, K)
    fp32 = 1e-5 * (x.abs().float() @ w.abs().T)  # fp32 accumulation, (M, N)

    # Int8 activation error: each x_k moves by at most half a step (one where the nudged
    # zero point clamps), errors independent across k, so the output error is a sum of
    # K terms of sd step/sqrt(12) * |w_nk|: 6 sd plus two worst-case clamped elements.
    step = _act_step(x)  # (M, 1)
    w_l2, w_max = w.norm(dim=1), w.abs().amax(dim=1)  # (N,)
    tol = 6 * step / math.sqrt(12.0) * w_l2 + 2 * step * w_max + fp32
    err = (y - ref).abs()
    assert (err <= tol).all(), f"max err {err.max():.3g}, tol there {tol[err == err.max()]}"
    # ...and far from a wrong layout: the error is much smaller than the signal.
    assert err.max() < 0.05 * ref.abs().max()

    # Tight: emulating KleidiAI's activation quantization leaves only fp32 rounding (and a
    # rare off-by-one rounding of one element).
    ref_q = _dequantized_reference(_fake_quant_rows(x), qweight, w_scales, group_size, K)
    err_q = (y - ref_q).abs()
    assert (err_q <= fp32 + 1.01 * step * w_max).all(), f"vs fake-quant: {err_q.max():.3g}"

    # llmrun's integer reference quantizes x symmetrically (step absmax/127) instead: both
    # roundings add up.
    ref_int = int4_linear_reference(x.float(), qweight, w_scales, group_size, K)
    step_sym = x.abs().float().amax(dim=1, keepdim=True) / 127.0
    sd2 = (step**2 + step_sym**2).sqrt() / math.sqrt(12.0) * w_l2
    tol2 = 6 * sd2 + 2 * (step + step_sym) * w_max + fp32
    err2 = (y - ref_int).abs()
    assert (err2 <= tol2).all(), f"vs int4_linear_reference: {err2.max():.3g}"


def test_is_supported_matches_platform():
    if os.environ.get("LLMRUN_REQUIRE_KLEIDIAI") == "1":
        assert ON_ARM, f"LLMRUN_REQUIRE_KLEIDIAI=1 on {platform.machine()}"
        assert KLEIDIAI, f"torch {torch.__version__} reports no KleidiAI"
    assert arm.is_supported() == KLEIDIAI
    if KLEIDIAI:
        print(f"\nKleidiAI available: torch {torch.__version__} on {platform.machine()}")


def test_warns_once_on_arm_without_kleidiai(monkeypatch):
    monkeypatch.setattr(arm, "_is_aarch64", lambda: True)
    monkeypatch.setattr(arm, "_probe", lambda: "torch was built without KleidiAI")
    monkeypatch.setattr(arm, "_warned", False)
    with pytest.warns(UserWarning, match="KleidiAI int4 kernels unavailable") as record:
        assert arm.is_supported() is False
        assert arm.is_supported() is False
    assert len(record) == 1


@pytest.mark.parametrize("group_size", GROUPS)
def test_pack_layout(group_size):
    q, qweight, scales = _random_int4(N, K, group_size, seed=1)
    packed = arm.pack(qweight, scales, group_size, K, N)
    if KLEIDIAI:
        # KleidiAI's own layout, not torch's silent fp32 fallback.
        assert packed.dtype == torch.uint8
        assert packed.numel() == _kleidiai_packed_size(N, K, group_size)
        assert packed.numel() != _packed_size_reference_layout(N, K, group_size)
        print(f"\npacked N={N} K={K} group={group_size}: {packed.numel()} bytes (KleidiAI)")
    else:
        assert packed.dtype == torch.float32
        assert packed.numel() == _packed_size_reference_layout(N, K, group_size)


@pytest.mark.parametrize(("M", "N"), SHAPES, ids=[f"M{m}-N{n}" for m, n in SHAPES])
@pytest.mark.parametrize("group_size", GROUPS)
def test_matmul_matches_dequantized_reference(group_size, M, N):
    q, qweight, scales = _random_int4(N, K, group_size, seed=2 + group_size)
    x = _random_x(M, K, seed=M)
    packed = arm.pack(qweight, scales, group_size, K, N)
    y = arm.matmul(x, packed, group_size, K, N)
    assert y.shape == (M, N) and y.dtype == torch.float32

    _check_against_references(y, x, qweight, scales, group_size, K)


@pytest.mark.parametrize(
    ("k", "group_size"),
    [(576, 128), (640, 256), (575, 0), (575, 64), (96, 128)],
    ids=["576-g128", "640-g256", "575-channel", "575-g64", "96-g128"],
)
def test_odd_k_and_partial_groups_are_padded(k, group_size):
    """llmrun's neutral format allows them (SmolLM2's dim 576 with g128 has 4.5 groups)."""
    _, qweight, scales = _random_int4(N, k, group_size, seed=k + group_size)
    x = _random_x(3, k, seed=9)
    packed = arm.pack(qweight, scales, group_size, k, N)
    if KLEIDIAI:
        assert packed.dtype == torch.uint8
    y = arm.matmul(x, packed, group_size, k, N)
    assert y.shape == (3, N)
    _check_against_references(y, x, qweight, scales, group_size, k)


def test_group_spanning_k_is_per_channel():
    """group_size == K with scales [N, 1] takes the per-channel (fp32 scale) kernel."""
    _, qweight, scales = _random_int4(N, 256, 256, seed=7)
    packed = arm.pack(qweight, scales, 256, 256, N)
    packed0 = arm.pack(qweight, scales.reshape(N), 0, 256, N)
    assert torch.equal(packed, packed0)
    x = _random_x(3, 256, seed=3)
    assert torch.equal(arm.matmul(x, packed, 256, 256, N), arm.matmul(x, packed0, 0, 256, N))


@pytest.mark.parametrize("group_size", [0, 64])
def test_bf16_input_returns_bf16(group_size):
    _, qweight, scales = _random_int4(N, K, group_size, seed=11)
    x = _random_x(3, K, seed=5)
    packed = arm.pack(qweight, scales, group_size, K, N)
    y32 = arm.matmul(x.bfloat16().float(), packed, group_size, K, N)
    y16 = arm.matmul(x.bfloat16(), packed, group_size, K, N)
    assert y16.dtype == torch.bfloat16 and y16.shape == (3, N)
    torch.testing.assert_close(y16.float(), y32, rtol=2e-2, atol=2e-2 * y32.abs().max().item())


def test_non_contiguous_and_empty_input():
    _, qweight, scales = _random_int4(N, K, 32, seed=13)
    packed = arm.pack(qweight, scales, 32, K, N)
    xt = _random_x(K, 5, seed=6).T  # (5, K), a transposed view
    assert not xt.is_contiguous()
    torch.testing.assert_close(
        arm.matmul(xt, packed, 32, K, N), arm.matmul(xt.contiguous(), packed, 32, K, N)
    )
    assert arm.matmul(torch.empty(0, K), packed, 32, K, N).shape == (0, N)


@pytest.mark.parametrize("group_size", [16, 48, 100])
def test_unsupported_group_sizes_raise(group_size):
    qweight = torch.zeros(N, K // 2, dtype=torch.uint8)
    scales = torch.ones(N, -(-K // group_size))
    with pytest.raises(ValueError, match="multiple of 32"):
        arm.pack(qweight, scales, group_size, K, N)
    with pytest.raises(ValueError, match="multiple of 32"):
        arm.matmul(torch.randn(1, K), torch.empty(0), group_size, K, N)


def test_bad_arguments_raise():
    _, qweight, scales = _random_int4(N, K, 32, seed=17)
    with pytest.raises(ValueError, match="uint8"):
        arm.pack(qweight.to(torch.int8), scales, 32, K, N)
    with pytest.raises(ValueError, match=r"\[N, ceil\(K/2\)\]"):
        arm.pack(qweight[:, :-1], scales, 32, K, N)
    with pytest.raises(ValueError, match="scales"):
        arm.pack(qweight, scales[:, :-1], 32, K, N)
    packed = arm.pack(qweight, scales, 32, K, N)
    with pytest.raises(ValueError, match="M, K"):
        arm.matmul(torch.randn(2, 3, K), packed, 32, K, N)
    with pytest.raises(ValueError, match="M, K"):
        arm.matmul(torch.randn(2, K + 2), packed, 32, K, N)


def test_rescored_head_on_the_arm_backends():
    """RescoredLinear as the Arm path builds it (KleidiAI int4 scan, the table's neutral rows; on
    x86 the scan is the native kernel's and the table rescores natively): each row's top k
    outputs are x . (q8 * s8) (within 1%: on x86 from int8 activations), the rest the scan's,
    and the argmax is the int8 layer's."""
    from llmrun.kernels import Int4Linear, Int8Linear, RescoredLinear, quantize_int4, quantize_int8

    gen = torch.Generator().manual_seed(9)
    n, k = 1000, 32
    w = torch.randn(n, K, generator=gen)
    scan = Int4Linear.from_neutral(*quantize_int4(w, 32), 32, K)  # arm-kleidiai on Arm
    q8, s8 = quantize_int8(w)
    exact = Int8Linear.from_neutral(q8, s8, backend="reference")
    assert scan.backend == ("arm-kleidiai" if KLEIDIAI else scan.backend)
    head = RescoredLinear(scan, exact, k)
    x = _random_x(3, K, seed=4)
    y, y4 = head(x), scan(x)
    picked = torch.zeros(3, n, dtype=torch.bool).scatter_(-1, y4.topk(k, -1).indices, True)
    want = x.double() @ (q8.double() * s8.double()[:, None]).T
    assert torch.equal(y[~picked], y4[~picked])
    err = (y.double() - want)[picked].abs()
    assert bool((err <= 0.01 * (x.double().abs() @ (q8.double().abs() * s8.double()[:, None]).T)[picked]).all())
    assert torch.equal(y.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("bits", [4, 8])
def test_block_formats_run_the_reference_after_one_warning(bits):
    """A GGUF's block formats as shipped (4-bit with offsets, as Q4_1 / Q4_K; 8-bit symmetric,
    as Q8_0): KleidiAI's ops take symmetric int4 only, so on Arm these layers run
    block_linear_reference (the x86 kernels' integer sums, exact but slow) after a warning
    that says so; elsewhere the reference is asked for by name."""
    from llmrun.kernels.block_linear import BlockLinear, block_linear_reference
    from llmrun.kernels.blocks import BlockWeight

    gen = torch.Generator().manual_seed(bits)
    n, k, group = 37, 100, 32
    G = -(-k // group)
    codes = torch.randint(0, 256, (n, k // 2 if bits == 4 else k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, G, generator=gen) * 0.02 + 0.001).half().float()
    offsets = -(torch.rand(n, G, generator=gen) * 0.1).half().float() if bits == 4 else None
    bw = BlockWeight(codes, bits, group, scales, offsets, k)
    if KLEIDIAI:
        with pytest.warns(UserWarning, match="KleidiAI takes symmetric int4 only"):
            layer = BlockLinear.from_blocks(bw)
    else:
        layer = BlockLinear.from_blocks(bw, backend="reference")
    assert layer.backend == "reference"
    x = _random_x(3, k, seed=6)
    y = layer(x)
    assert torch.equal(y, block_linear_reference(x, bw))
    w = bw.dequantize().double()
    err = (y.double() - x.double() @ w.T).abs()
    assert bool((err <= 0.02 * (x.double().abs() @ w.abs().T)).all())


def test_default_int4_is_what_the_platform_runs_natively():
    """Asymmetric int4 needs llmrun's block kernel (x86); on Arm the default is symmetric,
    the only int4 KleidiAI takes."""
    from llmrun.quant.schemes import DEFAULT_INT4

    assert DEFAULT_INT4 == ("symmetric" if ON_ARM else "asymmetric")
