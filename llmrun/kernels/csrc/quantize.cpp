// Float weights into asymmetric int4 groups: the search of block_quant.py (ggml's
// make_qkx2_quants) on AVX2 lanes, one group a lane. For each group x of a row, with
// importance weights w = rms(x) + |x|, the range [min(x, 0), max(x)] is cut into 15 + d steps
// for d in -1.0, -0.9, ..., 1.0; each candidate's codes get the w-weighted least-squares scale
// and offset (offset <= 0: refit with the offset pinned at 0 where it would be positive), and
// the candidate with the smallest w-weighted squared error wins (the plain 15-step grid
// unless one is smaller). Sums run over a group's elements in order, so the result does not
// depend on the thread count; torch's reductions add in another order, so a pick between two
// candidates of near-equal error may differ from the torch search's.
//     int4_group_search(w f32 [N, K], group_size) -> (codes u8 [N, K] in 0..15,
//                                                     scales f32 [N, G], offsets f32 [N, G])
// W ~= scale * code + offset per group; a partial last group is searched over its K % gs
// elements. A flat group (max == min(x, 0)) gets codes 0, scale 0 and offset min(x, 0).

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "ops.h"

namespace llmrun_quantize {
namespace {

constexpr int kVectors = 4;             // independent lanes of 8 in flight: the sums' latency hidden
constexpr int kLanes = 8 * kVectors;    // groups searched at once, one a lane (32 rows)
constexpr float kNmax = 15.0f;
constexpr int kSteps = 21;  // d = -1.0 + 0.1 i

// No FMA in the target: every product is rounded before its sum, as the torch search's are.
#define TGT __attribute__((target("avx2")))

struct Lanes {  // one value per lane
  __m256 v[kVectors];
};

#define EACH for (int u = 0; u < kVectors; ++u)

TGT inline __m256 codes_of(__m256 from_lo, __m256 grid) {
  const __m256 c = _mm256_round_ps(_mm256_mul_ps(from_lo, grid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_min_ps(_mm256_max_ps(c, _mm256_setzero_ps()), _mm256_set1_ps(kNmax));
}

// x, w, from_lo [n][kLanes]: sum_j w (s code_j + o - x_j)^2 per lane
TGT inline Lanes error_of(const float* x, const float* w, const float* from_lo, int64_t n, const Lanes& grid,
                          const Lanes& s, const Lanes& o) {
  Lanes err;
  EACH err.v[u] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    EACH {
      const int64_t at = j * kLanes + 8 * u;
      const __m256 c = codes_of(_mm256_loadu_ps(from_lo + at), grid.v[u]);
      const __m256 t = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(c, s.v[u]), o.v[u]), _mm256_loadu_ps(x + at));
      err.v[u] = _mm256_add_ps(err.v[u], _mm256_mul_ps(_mm256_mul_ps(t, t), _mm256_loadu_ps(w + at)));
    }
  }
  return err;
}

// kLanes groups of n elements, x [n][kLanes] (element j of lane l at x[kLanes j + l]); w and
// from_lo are scratch of the same shape. Writes the codes [n][kLanes] and each lane's scale
// and offset.
TGT void search_lanes(const float* x, int64_t n, float* w, float* from_lo, uint8_t* codes, float* scale_out,
                      float* offset_out) {
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  Lanes sq, lo, hi, sum_w, sum_x, flat, inv;
  EACH sq.v[u] = zero, lo.v[u] = zero, hi.v[u] = _mm256_set1_ps(-INFINITY), sum_w.v[u] = zero, sum_x.v[u] = zero;
  for (int64_t j = 0; j < n; ++j) {
    EACH {
      const __m256 v = _mm256_loadu_ps(x + j * kLanes + 8 * u);
      sq.v[u] = _mm256_add_ps(sq.v[u], _mm256_mul_ps(v, v));
      lo.v[u] = _mm256_min_ps(lo.v[u], v);
      hi.v[u] = _mm256_max_ps(hi.v[u], v);
    }
  }
  EACH {
    const __m256 rms = _mm256_sqrt_ps(_mm256_div_ps(sq.v[u], _mm256_set1_ps((float)n)));
    for (int64_t j = 0; j < n; ++j) {
      const int64_t at = j * kLanes + 8 * u;
      const __m256 v = _mm256_loadu_ps(x + at);
      const __m256 wj = _mm256_add_ps(rms, _mm256_and_ps(v, abs_mask));
      _mm256_storeu_ps(w + at, wj);
      _mm256_storeu_ps(from_lo + at, _mm256_sub_ps(v, lo.v[u]));
      sum_w.v[u] = _mm256_add_ps(sum_w.v[u], wj);
      sum_x.v[u] = _mm256_add_ps(sum_x.v[u], _mm256_mul_ps(wj, v));
    }
  }
  Lanes scale, offset, grid, best_err;  // the winner's; grid: its codes per unit, (15 + d) / span
  EACH {
    const __m256 range = _mm256_sub_ps(hi.v[u], lo.v[u]);
    flat.v[u] = _mm256_cmp_ps(range, zero, _CMP_EQ_OQ);
    const __m256 span = _mm256_blendv_ps(range, one, flat.v[u]);
    inv.v[u] = _mm256_div_ps(one, span);  // grids are (15 + d) * (1 / span), as torch's number / tensor
    scale.v[u] = _mm256_div_ps(span, _mm256_set1_ps(kNmax));
    offset.v[u] = lo.v[u];
    grid.v[u] = _mm256_mul_ps(inv.v[u], _mm256_set1_ps(kNmax));
  }
  best_err = error_of(x, w, from_lo, n, grid, scale, offset);
  for (int i = 0; i < kSteps; ++i) {
    Lanes cand_grid, sum_l, sum_l2, sum_xl, s, o, ok;
    EACH {
      cand_grid.v[u] = _mm256_mul_ps(inv.v[u], _mm256_set1_ps((float)(kNmax + (-1.0 + 0.1 * i))));
      sum_l.v[u] = zero, sum_l2.v[u] = zero, sum_xl.v[u] = zero;
    }
    for (int64_t j = 0; j < n; ++j) {
      EACH {
        const int64_t at = j * kLanes + 8 * u;
        const __m256 c = codes_of(_mm256_loadu_ps(from_lo + at), cand_grid.v[u]);
        const __m256 wc = _mm256_mul_ps(_mm256_loadu_ps(w + at), c);
        sum_l.v[u] = _mm256_add_ps(sum_l.v[u], wc);
        sum_l2.v[u] = _mm256_add_ps(sum_l2.v[u], _mm256_mul_ps(wc, c));
        sum_xl.v[u] = _mm256_add_ps(sum_xl.v[u], _mm256_mul_ps(wc, _mm256_loadu_ps(x + at)));
      }
    }
    EACH {
      const __m256 det = _mm256_sub_ps(_mm256_mul_ps(sum_w.v[u], sum_l2.v[u]), _mm256_mul_ps(sum_l.v[u], sum_l.v[u]));
      ok.v[u] = _mm256_cmp_ps(det, zero, _CMP_GT_OQ);
      const __m256 safe_det = _mm256_blendv_ps(one, det, ok.v[u]);
      const __m256 fit_s = _mm256_div_ps(
          _mm256_sub_ps(_mm256_mul_ps(sum_w.v[u], sum_xl.v[u]), _mm256_mul_ps(sum_x.v[u], sum_l.v[u])), safe_det);
      const __m256 fit_o = _mm256_div_ps(
          _mm256_sub_ps(_mm256_mul_ps(sum_l2.v[u], sum_x.v[u]), _mm256_mul_ps(sum_l.v[u], sum_xl.v[u])), safe_det);
      const __m256 positive = _mm256_cmp_ps(fit_o, zero, _CMP_GT_OQ);  // the grid must reach 0
      const __m256 pinned = _mm256_div_ps(sum_xl.v[u], _mm256_max_ps(sum_l2.v[u], _mm256_set1_ps(1e-30f)));
      s.v[u] = _mm256_blendv_ps(fit_s, pinned, positive);
      o.v[u] = _mm256_blendv_ps(fit_o, zero, positive);
    }
    const Lanes err = error_of(x, w, from_lo, n, cand_grid, s, o);
    EACH {
      const __m256 better = _mm256_and_ps(ok.v[u], _mm256_cmp_ps(err.v[u], best_err.v[u], _CMP_LT_OQ));
      best_err.v[u] = _mm256_blendv_ps(best_err.v[u], err.v[u], better);
      scale.v[u] = _mm256_blendv_ps(scale.v[u], s.v[u], better);
      offset.v[u] = _mm256_blendv_ps(offset.v[u], o.v[u], better);
      grid.v[u] = _mm256_blendv_ps(grid.v[u], cand_grid.v[u], better);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    EACH {
      const int64_t at = j * kLanes + 8 * u;
      const __m256i c = _mm256_cvtps_epi32(
          _mm256_blendv_ps(codes_of(_mm256_loadu_ps(from_lo + at), grid.v[u]), zero, flat.v[u]));
      const __m128i c16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
      _mm_storel_epi64((__m128i*)(codes + at), _mm_packus_epi16(c16, c16));
    }
  }
  EACH {
    _mm256_storeu_ps(scale_out + 8 * u, _mm256_blendv_ps(scale.v[u], zero, flat.v[u]));
    _mm256_storeu_ps(offset_out + 8 * u, offset.v[u]);
  }
}

#undef EACH

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> int4_group_search(const at::Tensor& weight, int64_t group_size) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat, "int4_group_search: a 2-D float32 weight");
  TORCH_CHECK(group_size > 0, "int4_group_search: group_size must be positive");
  TORCH_CHECK(__builtin_cpu_supports("avx2"), "int4_group_search needs AVX2");
  const at::Tensor wt = weight.contiguous();
  const int64_t N = wt.size(0), K = wt.size(1), G = (K + group_size - 1) / group_size;
  at::Tensor codes = empty_cpu({N, K}, at::kByte);
  at::Tensor scales = empty_cpu({N, G}, at::kFloat), offsets = empty_cpu({N, G}, at::kFloat);
  const float* src = wt.data_ptr<float>();
  uint8_t* codes_p = codes.data_ptr<uint8_t>();
  float *scales_p = scales.data_ptr<float>(), *offsets_p = offsets.data_ptr<float>();
  // blocks of kLanes rows: lane l holds row kLanes b + l's group (rows past N: zeros, dropped)
  at::parallel_for(0, (N + kLanes - 1) / kLanes, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> x(group_size * kLanes), w(group_size * kLanes), from_lo(group_size * kLanes);
    std::vector<uint8_t> lane_codes(group_size * kLanes);
    float scale[kLanes], offset[kLanes];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kLanes, rows = std::min<int64_t>(kLanes, N - r0);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t k0 = g * group_size, n = std::min(group_size, K - k0);
        for (int64_t l = 0; l < kLanes; ++l)
          for (int64_t j = 0; j < n; ++j) x[j * kLanes + l] = l < rows ? src[(r0 + l) * K + k0 + j] : 0.0f;
        search_lanes(x.data(), n, w.data(), from_lo.data(), lane_codes.data(), scale, offset);
        for (int64_t l = 0; l < rows; ++l) {
          for (int64_t j = 0; j < n; ++j) codes_p[(r0 + l) * K + k0 + j] = lane_codes[j * kLanes + l];
          scales_p[(r0 + l) * G + g] = scale[l];
          offsets_p[(r0 + l) * G + g] = offset[l];
        }
      }
    }
  });
  return {codes, scales, offsets};
}

}  // namespace llmrun_quantize
