// llmrun's int4-weight x int8-activation matmul ops (int4_mm, int8_mm, quant_act): argument
// checks, activation quantization and the choice of tile shape and ISA. The kernel bodies
// (int4mm_body.inc, the private weight layout included) are compiled once per ISA, each in
// its own translation unit (matmul_*.cpp), and chosen at run time:
//   isa 0: AVX512-VNNI, zmm vpdpbusd, one panel (16 columns) per vector
//   isa 1: AVX-VNNI,    ymm vpdpbusd, two vectors per panel (VEX encoding when the CPU has
//          AVX-VNNI, else the same ymm code in EVEX encoding on AVX512-VNNI + VL CPUs)
//   isa 2: AVX2,        vpmaddubsw + vpmaddwd (u8 x s8 pairs of |q| <= 8 never saturate)
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "bodies.h"
#include "int4mm.h"
#include "ops.h"

namespace llmrun_kernels {

// Software prefetch distance in bytes for GEMM (M > 3); 4 KiB measured 5-8% faster than 1-2 KiB.
// GEMV (decode, M <= 3) issues none and leaves streaming to the hardware prefetcher: measured in
// whole decode steps (2 threads, Zen 5) Gemma 3 270M 79 -> 90 t/s (its 168 MB int8 head alone
// 27 -> 36 GB/s), SmolLM2 equal within noise.
static constexpr int64_t PREFETCH_BYTES = 4096;

// ------------------------------------------------------------- activation quantization
// Per row, symmetric: inv = 127 / absmax (float32 division), a = round_half_even(x * inv)
// (float32 multiply), stored as a + 128; s_a = absmax / 127. A zero row gives inv = 0,
// s_a = 0. llmrun.kernels.reference.quantize_activations does the identical float ops.
template <typename T>
__attribute__((target("avx2,fma,f16c"))) static inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  }
}

template <typename T>
static inline float to_f(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    uint32_t u = (uint32_t)v.x << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
}

template <typename T>
__attribute__((target("avx2,fma,f16c"))) static void quant_row(const T* x, int64_t K, int64_t Kpad, uint8_t* a, float* sa) {
  __m256 mx = _mm256_setzero_ps();
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(load8(x + k), absmask));
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, mx);
  float amax = 0.f;
  for (int i = 0; i < 8; i++) amax = std::max(amax, tmp[i]);
  for (; k < K; k++) amax = std::max(amax, std::fabs(to_f(x[k])));
  const float inv = amax > 0.f ? 127.0f / amax : 0.0f;
  *sa = amax / 127.0f;
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i off = _mm256_set1_epi32(128);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x + k), vinv));  // MXCSR: nearest even
    q = _mm256_add_epi32(_mm256_min_epi32(_mm256_max_epi32(q, lo), hi), off);
    __m128i q16 = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storel_epi64((__m128i*)(a + k), _mm_packus_epi16(q16, q16));
  }
  for (; k < K; k++) {
    float v = std::nearbyint(to_f(x[k]) * inv);
    v = std::min(127.f, std::max(-127.f, v));
    a[k] = (uint8_t)((int)v + 128);
  }
  for (; k < Kpad; k++) a[k] = 128;
}

static void quantize_activations(const at::Tensor& x, int64_t Kpad, uint8_t* a, float* sa) {
  const int64_t M = x.size(0), K = x.size(1);
  auto body = [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; m++) {
      if (x.scalar_type() == at::kFloat)
        quant_row(x.data_ptr<float>() + m * K, K, Kpad, a + m * Kpad, sa + m);
      else
        quant_row(x.data_ptr<at::BFloat16>() + m * K, K, Kpad, a + m * Kpad, sa + m);
    }
  };
  if (M * K >= (1 << 16)) at::parallel_for(0, M, 1, body); else body(0, M);
}

// ------------------------------------------------------------------------- ISA support
int64_t isa_support() {
  __builtin_cpu_init();
  int64_t m = 0;
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool a512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                    __builtin_cpu_supports("avx512vnni");
  if (a512) m |= 1;                                          // zmm VNNI
  if (avx2 && __builtin_cpu_supports("avxvnni")) m |= 2;     // ymm VNNI (VEX)
  else if (a512) m |= 4;                                     // ymm VNNI (EVEX)
  if (avx2) m |= 8;
  return m;
}

// ------------------------------------------------------------------------------ ops
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sc, const at::Tensor& corr,
                          int64_t group_size, int64_t K, int64_t N, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "int4_mm: x must be [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "int4_mm: x must be fp32 or bf16");
  TORCH_CHECK(w.dim() == 3 && w.size(2) == 64 && w.scalar_type() == at::kByte && w.is_contiguous(), "int4_mm: bad packed weight");
  TORCH_CHECK(sc.dim() == 3 && sc.size(0) == w.size(0) && sc.size(2) == 16 && sc.is_contiguous(), "int4_mm: bad packed scales");
  TORCH_CHECK(sc.scalar_type() == at::kHalf || sc.scalar_type() == at::kFloat, "int4_mm: scales must be fp16 or fp32");
  TORCH_CHECK(corr.numel() == w.size(0) * 16 && corr.is_contiguous(), "int4_mm: bad correction");
  TORCH_CHECK(N <= w.size(0) * 16 && K <= w.size(1) * 8, "int4_mm: N or K larger than the packed weight");
  const at::Tensor xc = x.contiguous();
  const int64_t M = x.size(0), NP = w.size(0), Kpad = w.size(1) * 8;
  const bool grouped = group_size > 0;
  TORCH_CHECK(!grouped || (group_size % 8 == 0 && sc.size(1) * group_size == Kpad), "int4_mm: group size / padding mismatch");
  TORCH_CHECK(grouped ? corr.scalar_type() == at::kFloat : corr.scalar_type() == at::kInt, "int4_mm: bad correction dtype");
  at::Tensor out = empty_cpu({M, N}, x.scalar_type());
  if (M == 0 || N == 0) return out;
  at::Tensor a = empty_cpu({M, Kpad}, at::kByte);
  at::Tensor sa = empty_cpu({M}, at::kFloat);
  quantize_activations(xc, Kpad, a.data_ptr<uint8_t>(), sa.data_ptr<float>());

  RunArgs p;
  p.a = a.data_ptr<uint8_t>();
  p.sa = sa.data_ptr<float>();
  p.w = w.data_ptr<uint8_t>();
  p.wps = w.size(1) * 64;
  p.sc = sc.data_ptr();
  p.sf16 = sc.scalar_type() == at::kHalf;
  p.corr = corr.data_ptr();
  p.M = M;
  p.N = N;
  p.Kpad = Kpad;
  p.G = (int)sc.size(1);
  p.lpg = grouped ? (int)(group_size / 8) : (int)w.size(1);
  p.grouped = grouped;
  p.int8 = false;
  p.out = out.data_ptr();
  p.out_f32 = x.scalar_type() == at::kFloat;
  p.pf = M <= 3 ? 0 : PREFETCH_BYTES;

  const int64_t sup = isa_support();
  using RunFn = void (*)(const RunArgs&, int64_t, int64_t, int, int);
  RunFn fn;
  int rmax, cmax;
  if (isa == 0) {
    TORCH_CHECK(sup & 1, "int4_mm: this CPU lacks AVX512-VNNI");
    fn = bodies(BODIES_AVX512).run_panels; rmax = 6; cmax = 4;
  } else if (isa == 1) {
    TORCH_CHECK(sup & 6, "int4_mm: this CPU lacks AVX-VNNI");
    fn = bodies((sup & 2) ? BODIES_AVXVNNI : BODIES_AVXVNNI_EVEX).run_panels; rmax = 3; cmax = 1;
  } else {
    TORCH_CHECK(sup & 8, "int4_mm: this CPU lacks AVX2");
    fn = bodies(BODIES_AVX2).run_panels; rmax = 3; cmax = 1;
  }
  TORCH_CHECK(fn != nullptr, "int4_mm: the bodies of isa ", isa, " are not loaded (native.isa_code loads them)");
  // tile shape: GEMV (M <= 3) takes all rows at once; GEMM reuses each unpacked weight
  // register across rmax rows and cmax panels.
  int rt, ct;
  // GEMV streams two panels at once only when panels are long (>= 16 KiB): with short panels
  // the two interleaved streams measured ~40% slower than one (K = 576: 10 vs 18 GB/s/core)
  if (M <= 3) { rt = (int)M; ct = (p.wps >= (16 << 10)) ? std::min(cmax, 2) : 1; }
  else { rt = rmax; ct = cmax; }
  if (!grouped && isa == 0 && M > 3) { rt = 6; ct = 4; }
  if (grouped && isa == 0 && M > 3) { rt = 4; ct = 3; }  // the zmm bodies' GRMAX x GCMAX
  if (M > 3) {  // balance the row tiles: M = 8 runs as 4 + 4, not 6 + 2
    const int64_t ntiles = (M + rt - 1) / rt;
    rt = (int)((M + ntiles - 1) / ntiles);
  }
  const int64_t nblk = (NP + ct - 1) / ct;
  const int64_t work = M * NP * Kpad;  // ~ MACs / 16
  auto body = [&](int64_t b, int64_t e) { fn(p, b * ct, std::min(NP, e * ct), rt, ct); };
  if (work < (int64_t)1 << 15 || nblk == 1) body(0, nblk);
  else at::parallel_for(0, nblk, 1, body);
  return out;
}


// Per-channel int8 weights (heads): w uint8 [NP, K4, 64] (see tile_kernel_i8), sc fp32
// [NP, 1, 16], corr int32 [NP*16]. VNNI ISAs only (u8 x s8 pairs of full-range int8 would
// saturate AVX2's vpmaddubsw).
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sc, const at::Tensor& corr,
                          int64_t K, int64_t N, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "int8_mm: x must be [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "int8_mm: x must be fp32 or bf16");
  TORCH_CHECK(w.dim() == 3 && w.size(2) == 64 && w.scalar_type() == at::kByte && w.is_contiguous() && w.size(1) % 2 == 0,
              "int8_mm: bad packed weight");
  TORCH_CHECK(sc.scalar_type() == at::kFloat && sc.numel() == w.size(0) * 16 && sc.is_contiguous(), "int8_mm: bad scales");
  TORCH_CHECK(corr.scalar_type() == at::kInt && corr.numel() == w.size(0) * 16 && corr.is_contiguous(), "int8_mm: bad corr");
  TORCH_CHECK(N <= w.size(0) * 16 && K <= w.size(1) * 4, "int8_mm: N or K larger than the packed weight");
  const at::Tensor xc = x.contiguous();
  const int64_t M = x.size(0), NP = w.size(0), Kpad = w.size(1) * 4;
  at::Tensor out = empty_cpu({M, N}, x.scalar_type());
  if (M == 0 || N == 0) return out;
  at::Tensor a = empty_cpu({M, Kpad}, at::kByte);
  at::Tensor sa = empty_cpu({M}, at::kFloat);
  quantize_activations(xc, Kpad, a.data_ptr<uint8_t>(), sa.data_ptr<float>());
  RunArgs p;
  p.a = a.data_ptr<uint8_t>();
  p.sa = sa.data_ptr<float>();
  p.w = w.data_ptr<uint8_t>();
  p.wps = w.size(1) * 64;
  p.sc = sc.data_ptr();
  p.sf16 = false;
  p.corr = corr.data_ptr();
  p.M = M;
  p.N = N;
  p.Kpad = Kpad;
  p.G = 1;
  p.lpg = (int)w.size(1);
  p.grouped = false;
  p.int8 = true;
  p.out = out.data_ptr();
  p.out_f32 = x.scalar_type() == at::kFloat;
  p.pf = M <= 3 ? 0 : PREFETCH_BYTES;
  const int64_t sup = isa_support();
  using RunFn = void (*)(const RunArgs&, int64_t, int64_t, int, int);
  RunFn fn;
  int rmax, cmax;
  if (isa == 0 && (sup & 1)) { fn = bodies(BODIES_AVX512).run_panels; rmax = 6; cmax = 4; }
  else {
    TORCH_CHECK((isa == 0 || isa == 1) && (sup & 6), "int8_mm: needs AVX512-VNNI or AVX-VNNI");
    fn = bodies((sup & 2) ? BODIES_AVXVNNI : BODIES_AVXVNNI_EVEX).run_panels; rmax = 3; cmax = 1;
  }
  TORCH_CHECK(fn != nullptr, "int8_mm: the bodies of isa ", isa, " are not loaded (native.isa_code loads them)");
  int rt = M <= 3 ? (int)M : rmax, ct = M <= 3 ? ((p.wps >= (16 << 10)) ? std::min(cmax, 2) : 1) : cmax;
  if (M > 3) { const int64_t nt = (M + rt - 1) / rt; rt = (int)((M + nt - 1) / nt); }
  const int64_t nblk = (NP + ct - 1) / ct;
  auto body = [&](int64_t b, int64_t e) { fn(p, b * ct, std::min(NP, e * ct), rt, ct); };
  if (M * NP * Kpad < ((int64_t)1 << 14) || nblk == 1) body(0, nblk);
  else at::parallel_for(0, nblk, 1, body);
  return out;
}

std::tuple<at::Tensor, at::Tensor> quant_act(const at::Tensor& x, int64_t Kpad) {
  TORCH_CHECK(x.dim() == 2 && Kpad >= x.size(1), "quant_act: x must be [M, K], Kpad >= K");
  const at::Tensor xc = x.contiguous();
  at::Tensor a = empty_cpu({x.size(0), Kpad}, at::kByte);
  at::Tensor sa = empty_cpu({x.size(0)}, at::kFloat);
  quantize_activations(xc, Kpad, a.data_ptr<uint8_t>(), sa.data_ptr<float>());
  return {a, sa};
}

}  // namespace llmrun_kernels
