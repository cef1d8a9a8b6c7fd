// llmrun::block_mm: block-quantized weights x int8 activations (the kernel bodies and the
// layout: blockmm_body.inc, compiled per ISA in matmul_*.cpp). Activations are quantized with a
// scale per row and weight group (llama.cpp's Q8_0 activations do the same per 32): an outlier
// channel then costs only its group's precision, not its row's.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "bodies.h"
#include "ops.h"

namespace llmrun_kernels {

// One group of one row, symmetric: inv = 127 / absmax (float32 division), a = round_half_even(
// x * inv) (float32 multiply), s_a = absmax / 127; an all-zero group gives a = 0, s_a = 0.
// llmrun.kernels.block_linear.quantize_activations_grouped does the identical float operations.
template <typename T>
static void quant_group(const T* x, int64_t n, int8_t* a, float* sa, int32_t* asum) {
  float amax = 0.f;
  for (int64_t k = 0; k < n; k++) amax = std::max(amax, std::fabs(static_cast<float>(x[k])));
  const float inv = amax > 0.f ? 127.0f / amax : 0.0f;
  int32_t s = 0;
  for (int64_t k = 0; k < n; k++) {
    const float q = std::min(127.f, std::max(-127.f, std::nearbyint(static_cast<float>(x[k]) * inv)));
    a[k] = (int8_t)q;
    s += (int32_t)q;
  }
  *sa = amax / 127.0f;
  *asum = s;
}

template <typename T>
__attribute__((target("avx2,fma"))) static inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else {  // bf16: the high half of a float
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  }
}

// quant_group for n a multiple of 8, 8 lanes at a time: the same float operations (the
// conversion rounds to nearest even, as nearbyint does under the default MXCSR)
template <typename T>
__attribute__((target("avx2,fma"))) static void quant_group8(const T* x, int64_t n, int8_t* a, float* sa,
                                                             int32_t* asum) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mx = _mm256_setzero_ps();
  for (int64_t k = 0; k < n; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(load8(x + k), absmask));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mx);
  float amax = 0.f;
  for (float v : lanes) amax = std::max(amax, v);
  const float inv = amax > 0.f ? 127.0f / amax : 0.0f;
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  __m256i sum = _mm256_setzero_si256();
  for (int64_t k = 0; k < n; k += 8) {
    __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x + k), vinv));
    q = _mm256_min_epi32(_mm256_max_epi32(q, lo), hi);
    sum = _mm256_add_epi32(sum, q);
    const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storel_epi64((__m128i*)(a + k), _mm_packs_epi16(q16, q16));
  }
  alignas(32) int32_t parts[8];
  _mm256_store_si256((__m256i*)parts, sum);
  int32_t s = 0;
  for (int32_t v : parts) s += v;
  *sa = amax / 127.0f;
  *asum = s;
}

// a (int8 [M][Kpad], 0 past K), sa and asum [M][G]: each row's groups of `group` inputs
template <typename T>
static void quantize_grouped(const T* x, int64_t M, int64_t K, int64_t Kpad, int64_t group, int8_t* a, float* sa,
                             int32_t* asum) {
  const int64_t G = Kpad / group;
  const bool avx2 = isa_support() & 8;
  auto body = [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; m++) {
      std::fill(a + m * Kpad + K, a + (m + 1) * Kpad, (int8_t)0);
      for (int64_t g = 0; g < G; g++) {
        const int64_t k0 = g * group, n = std::max<int64_t>(0, std::min(group, K - k0));
        if (avx2 && n % 8 == 0)
          quant_group8(x + m * K + k0, n, a + m * Kpad + k0, sa + m * G + g, asum + m * G + g);
        else
          quant_group(x + m * K + k0, n, a + m * Kpad + k0, sa + m * G + g, asum + m * G + g);
      }
    }
  };
  if (M * K >= (1 << 16)) at::parallel_for(0, M, 1, body); else body(0, M);
}

at::Tensor block_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sc, const at::Tensor& of,
                           int64_t bits, int64_t group_size, int64_t K, int64_t N, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "block_mm: x must be [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "block_mm: x must be fp32 or bf16");
  TORCH_CHECK(bits == 4 || bits == 8, "block_mm: code bits must be 4 or 8");
  TORCH_CHECK(w.dim() == 3 && w.size(2) == 64 && w.scalar_type() == at::kByte && w.is_contiguous(), "block_mm: bad packed weight");
  const int64_t kpl = bits == 4 ? 8 : 4;  // k per 64-byte line
  const int64_t NP = w.size(0), Kpad = w.size(1) * kpl;
  TORCH_CHECK(group_size > 0 && group_size % kpl == 0 && Kpad % group_size == 0, "block_mm: group size / padding mismatch");
  const int64_t G = Kpad / group_size;
  TORCH_CHECK(sc.dim() == 3 && sc.size(0) == NP && sc.size(1) == G && sc.size(2) == 16 && sc.is_contiguous(),
              "block_mm: bad packed scales");
  TORCH_CHECK(sc.scalar_type() == at::kHalf || sc.scalar_type() == at::kFloat, "block_mm: scales must be fp16 or fp32");
  const bool asym = of.numel() > 0;
  TORCH_CHECK(!asym || (of.sizes() == sc.sizes() && of.scalar_type() == sc.scalar_type() && of.is_contiguous()),
              "block_mm: offsets must match the scales");
  TORCH_CHECK(N <= NP * 16 && K <= Kpad, "block_mm: N or K larger than the packed weight");
  const at::Tensor xc = x.contiguous();
  const int64_t M = x.size(0);
  at::Tensor out = empty_cpu({M, N}, x.scalar_type());
  if (M == 0 || N == 0) return out;
  at::Tensor a = empty_cpu({M, Kpad}, at::kChar);
  at::Tensor sa = empty_cpu({M, G}, at::kFloat);
  at::Tensor asum = empty_cpu({M, G}, at::kInt);
  if (x.scalar_type() == at::kFloat)
    quantize_grouped(xc.data_ptr<float>(), M, K, Kpad, group_size, a.data_ptr<int8_t>(), sa.data_ptr<float>(),
                     asum.data_ptr<int32_t>());
  else
    quantize_grouped(xc.data_ptr<at::BFloat16>(), M, K, Kpad, group_size, a.data_ptr<int8_t>(), sa.data_ptr<float>(),
                     asum.data_ptr<int32_t>());

  BlockArgs p;
  p.a = a.data_ptr<int8_t>();
  p.sa = sa.data_ptr<float>();
  p.asum = asum.data_ptr<int32_t>();
  p.w = w.data_ptr<uint8_t>();
  p.wps = w.size(1) * 64;
  p.sc = sc.data_ptr();
  p.of = asym ? of.data_ptr() : nullptr;
  p.f16 = sc.scalar_type() == at::kHalf;
  p.M = M;
  p.N = N;
  p.Kpad = Kpad;
  p.G = (int)G;
  p.lpg = (int)(group_size / kpl);
  p.bits = (int)bits;
  p.out = out.data_ptr();
  p.out_f32 = x.scalar_type() == at::kFloat;
  p.pf = M <= 3 ? 0 : 4096;  // as int4_mm: GEMV leaves streaming to the hardware prefetcher

  const int64_t sup = isa_support();
  using RunFn = void (*)(const BlockArgs&, int64_t, int64_t, int, int);
  RunFn fn;
  int rmax, cmax;
  if (isa == 0) {
    TORCH_CHECK(sup & 1, "block_mm: this CPU lacks AVX512-VNNI");
    fn = bodies(BODIES_AVX512).block_run_panels; rmax = 4; cmax = 3;
  } else if (isa == 1) {
    TORCH_CHECK(sup & 6, "block_mm: this CPU lacks AVX-VNNI");
    fn = bodies((sup & 2) ? BODIES_AVXVNNI : BODIES_AVXVNNI_EVEX).block_run_panels; rmax = 3; cmax = 1;
  } else {
    TORCH_CHECK(isa == 2, "block_mm: unknown isa ", isa);
    TORCH_CHECK(sup & 8, "block_mm: this CPU lacks AVX2");
    fn = bodies(BODIES_AVX2).block_run_panels; rmax = 4; cmax = 1;
  }
  TORCH_CHECK(fn != nullptr, "block_mm: the bodies of isa ", isa, " are not loaded (native.isa_code loads them)");
  // GEMV (M <= 3) takes all rows at once and streams two panels only when panels are long
  // (the reason: int4_mm); GEMM balances its row tiles (M = 8 runs as 4 + 4)
  int rt, ct;
  if (M <= 3) {
    rt = (int)M;
    ct = (p.wps >= (16 << 10)) ? std::min(cmax, 2) : 1;
  } else {
    const int64_t ntiles = (M + rmax - 1) / rmax;
    rt = (int)((M + ntiles - 1) / ntiles);
    ct = cmax;
  }
  const int64_t nblk = (NP + ct - 1) / ct;
  auto body = [&](int64_t b, int64_t e) { fn(p, b * ct, std::min(NP, e * ct), rt, ct); };
  if (M * NP * Kpad < ((int64_t)1 << 15) || nblk == 1) body(0, nblk);
  else at::parallel_for(0, nblk, 1, body);
  return out;
}

}  // namespace llmrun_kernels
