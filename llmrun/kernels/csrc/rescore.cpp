// Rescoring a wide layer's largest outputs (RescoredLinear in modules.py): y holds an
// approximate x @ W^T (an int4 copy's); each row's k largest entries are recomputed as int8_mm
// computes them (int4mm.cpp), from its int8 panel table (w uint8 [NP, K4, 64], byte 4c+j of
// line l is q[16p+c][4l+j] as int8, or with unsigned_codes u = q + 128 as block_mm reads the
// same table on AVX2; sc fp32 [NP*16]) and the same quantized activations (quant_act: a uint8
// [M, K4*4] = a_int8 + 128, sa fp32 [M]):
//     out = y;  out[m, n] = float(sum_k a[m, k] q[n, k]) * (sc[n] * sa[m])   for n in top_k(y[m])
// bit for bit int8_mm's value, and block_mm's for one group per row (its activations per group
// are quant_act's per row, its sum S - 128 A is sum a q, its scale product the same).
// rescore_top_k_blocks does the same against a block-quantized table (block_mm's panels; the
// tied tables of GGUF files as shipped), from float activations.
// Per row a threshold from a sample, one pass over y collecting the entries above it, the k
// largest of those, then one k-row dot per pick. NaN entries are never picked.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <functional>
#include <utility>
#include <vector>

#include "ops.h"

namespace llmrun_rescore {

using Entry = std::pair<float, int64_t>;  // (value, column)

// A value t at most v's k-th largest: the k-th largest of every 8th entry (of every entry
// when that sample is smaller than k; -inf when it holds fewer than k numbers), so at least k
// entries (or every number) are >= t, and the sample is cheap beside the full scan.
static float top_k_threshold(const float* v, int64_t N, int64_t k) {
  const int64_t stride = N / 8 >= k ? 8 : 1;
  std::vector<float> sample;
  sample.reserve(N / stride + 1);
  for (int64_t n = 0; n < N; n += stride)
    if (v[n] == v[n]) sample.push_back(v[n]);
  if ((int64_t)sample.size() < k) return -INFINITY;
  std::nth_element(sample.begin(), sample.begin() + (k - 1), sample.end(), std::greater<float>());
  return sample[k - 1];
}

// The entries of v[begin, end) >= t (NaN never is), appended to `out`.
static void collect_at_least(const float* v, int64_t begin, int64_t end, float t, std::vector<Entry>& out) {
  for (int64_t n = begin; n < end; n++)
    if (v[n] >= t) out.push_back({v[n], n});
}

// flip: 0x80 where the table holds u = q + 128 (q = int8(u ^ 0x80)), else 0
static int32_t row_dot(const uint8_t* a, const uint8_t* w, int64_t K4, int64_t n, uint8_t flip) {
  const uint8_t* c = w + (n / 16) * K4 * 64 + (n % 16) * 4;  // line l at c + 64 l
  int32_t acc = 0;
  for (int64_t l = 0; l < K4; l++)
    for (int j = 0; j < 4; j++) acc += ((int32_t)a[4 * l + j] - 128) * (int32_t)(int8_t)(c[64 * l + j] ^ flip);
  return acc;
}

// out = y with each row's k largest entries replaced by their exact values: values(m, picks,
// count, o) writes o[n] for the columns n of picks[0, count) (rows of the exact table against
// row m's activations).
template <typename Values>
static at::Tensor rescore_with(const at::Tensor& y, int64_t k, const Values& values) {
  TORCH_CHECK(k >= 0, "rescore_top_k: k must be >= 0");
  const int64_t M = y.size(0), N = y.size(1);
  k = std::min(k, N);
  at::Tensor out = y.contiguous().clone();
  if (M == 0 || k == 0) return out;
  float* o = out.data_ptr<float>();
  // One row's picks, its k largest entries by (value, column): the entries at least a
  // threshold (top_k_threshold), collected in `parts` slices, then the k largest of those.
  auto picks = [&](int64_t m, int64_t parts) {
    const float* row = o + m * N;
    const float t = top_k_threshold(row, N, k);
    std::vector<std::vector<Entry>> found(parts);
    at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {  // inline inside the rows' parallel_for
      for (int64_t s = b; s < e; s++) collect_at_least(row, s * N / parts, (s + 1) * N / parts, t, found[s]);
    });
    std::vector<Entry> all;
    for (auto& f : found) all.insert(all.end(), f.begin(), f.end());
    if ((int64_t)all.size() > k) {
      std::nth_element(all.begin(), all.begin() + k, all.end(), std::greater<Entry>());
      all.resize(k);
    }
    return all;
  };
  auto rescore = [&](int64_t m, const std::vector<Entry>& chosen, int64_t b, int64_t e) {
    values(m, chosen.data() + b, e - b, o + m * N);
  };
  if (M == 1) {  // decode: both stages split across the threads
    const std::vector<Entry> chosen = picks(0, at::get_num_threads());
    at::parallel_for(0, (int64_t)chosen.size(), 16, [&](int64_t b, int64_t e) { rescore(0, chosen, b, e); });
  } else {
    at::parallel_for(0, M, 1, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; m++) {
        const std::vector<Entry> chosen = picks(m, 1);
        rescore(m, chosen, 0, (int64_t)chosen.size());
      }
    });
  }
  return out;
}

at::Tensor rescore_top_k(const at::Tensor& y, const at::Tensor& a, const at::Tensor& sa, const at::Tensor& w,
                                const at::Tensor& sc, int64_t k, bool unsigned_codes) {
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == at::kFloat, "rescore_top_k: y must be float32 [M, N]");
  TORCH_CHECK(w.dim() == 3 && w.size(2) == 64 && w.scalar_type() == at::kByte && w.is_contiguous(),
              "rescore_top_k: bad packed int8 table");
  const int64_t M = y.size(0), N = y.size(1), K4 = w.size(1);
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kByte && a.size(0) == M && a.size(1) == K4 * 4 && a.is_contiguous(),
              "rescore_top_k: a must be uint8 [M, Kpad] (quant_act)");
  TORCH_CHECK(sa.scalar_type() == at::kFloat && sa.numel() == M && sa.is_contiguous(), "rescore_top_k: bad sa");
  TORCH_CHECK(sc.scalar_type() == at::kFloat && sc.is_contiguous() && sc.numel() == w.size(0) * 16,
              "rescore_top_k: bad scales");
  TORCH_CHECK(N <= w.size(0) * 16, "rescore_top_k: y wider than the table");
  const uint8_t* ap = a.data_ptr<uint8_t>();
  const float* sap = sa.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  const uint8_t flip = unsigned_codes ? 0x80 : 0;
  return rescore_with(y, k, [&](int64_t m, const Entry* picks, int64_t count, float* o) {
    for (int64_t i = 0; i < count; i++) {
      const int64_t n = picks[i].second;
      o[n] = (float)row_dot(ap + m * K4 * 4, wp, K4, n, flip) * (sp[n] * sap[m]);
    }
  });
}

// Rows of a block-quantized table (block_mm's panels, blockmm_body.inc) against float x [K]:
// per group s * sum x (u - zero), or s * sum x u + o * sum x, in float32, each sum in k order
// (sx [G]: the groups' sums of x, the same for every row). With AVX2, 16 rows at a time, one
// per vector lane: each lane does its row's float operations in the same order (a multiply,
// then an add: no FMA), so both paths give the same bits.
template <int BITS, typename S>
struct BlockRows {
  const float* x;
  const float* sx;
  int64_t K;
  const uint8_t* w;
  int64_t L;  // 64-byte lines per panel
  const S* sc;
  const S* of;  // nullptr: symmetric
  int64_t G, gs;
  static constexpr int KPL = BITS == 4 ? 8 : 4;  // k per line
  static constexpr float ZERO_SYM = (float)(1 << (BITS - 1));

  int64_t col(int64_t n) const { return (n / 16) * L * 64 + (n % 16) * 4; }  // line l at col + 64 l
  int64_t soff(int64_t n) const { return (n / 16) * G * 16 + n % 16; }
  static int code(uint32_t bytes, int j) {  // code j of a column's 4 bytes in a line
    return BITS == 8 ? (bytes >> (8 * j)) & 255 : (bytes >> (8 * (j % 4) + 4 * (j / 4))) & 15;
  }
  float finish(float total, float sw, int64_t n, int64_t g) const {
    const float s = static_cast<float>(sc[soff(n) + g * 16]);
    return of ? total + (s * sw + static_cast<float>(of[soff(n) + g * 16]) * sx[g]) : total + s * sw;
  }

  float one(int64_t n) const {
    const uint8_t* c = w + col(n);
    const float zero = of ? 0.f : ZERO_SYM;
    float total = 0.f;
    for (int64_t g = 0; g < G; g++) {
      float sw = 0.f;
      for (int64_t k = g * gs; k < std::min(K, (g + 1) * gs); k++) {
        uint32_t bytes;
        std::memcpy(&bytes, c + (k / KPL) * 64, 4);
        sw += x[k] * ((float)code(bytes, (int)(k % KPL)) - zero);
      }
      total = finish(total, sw, n, g);
    }
    return total;
  }

  // rows ns[0, count), count <= LANES: two vectors of 8 lanes (two add chains in flight)
  static constexpr int LANES = 16;
  __attribute__((target("avx2,f16c"))) void lanes(const int64_t* ns, int count, float* o) const {
    alignas(32) int32_t offs[LANES];
    for (int i = 0; i < LANES; i++) offs[i] = (int32_t)col(ns[std::min(i, count - 1)]);
    __m256i voff[2];
    for (int h = 0; h < 2; h++) voff[h] = _mm256_load_si256((const __m256i*)(offs + 8 * h));
    const __m256 zero = _mm256_set1_ps(of ? 0.f : ZERO_SYM);
    const __m256i mask = _mm256_set1_epi32(BITS == 8 ? 255 : 15);
    __m256 total[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t g = 0; g < G; g++) {
      __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
      const int64_t k1 = std::min(K, (g + 1) * gs);
      for (int64_t k = g * gs; k < k1;) {
        const int* line = (const int*)(w + (k / KPL) * 64);
        const __m256i bytes[2] = {_mm256_i32gather_epi32(line, voff[0], 1), _mm256_i32gather_epi32(line, voff[1], 1)};
        for (int j = (int)(k % KPL); j < KPL && k < k1; j++, k++) {
          const int shift = BITS == 8 ? 8 * j : 8 * (j % 4) + 4 * (j / 4);
          const __m256 xk = _mm256_set1_ps(x[k]);
          for (int h = 0; h < 2; h++) {
            const __m256i u = _mm256_and_si256(_mm256_srli_epi32(bytes[h], shift), mask);
            const __m256 d = _mm256_sub_ps(_mm256_cvtepi32_ps(u), zero);
            acc[h] = _mm256_add_ps(acc[h], _mm256_mul_ps(xk, d));
          }
        }
      }
      // total + s * sw (+ o * sx), as finish() does per row
      const __m256 sxg = _mm256_set1_ps(sx[g]);
      for (int h = 0; h < 2; h++) {
        const __m256 sv = scales(sc, ns, count, 8 * h, g);
        const __m256 part = _mm256_mul_ps(sv, acc[h]);
        total[h] = _mm256_add_ps(total[h], of ? _mm256_add_ps(part, _mm256_mul_ps(scales(of, ns, count, 8 * h, g), sxg)) : part);
      }
    }
    alignas(32) float t[LANES];
    for (int h = 0; h < 2; h++) _mm256_store_ps(t + 8 * h, total[h]);
    for (int i = 0; i < count; i++) o[ns[i]] = t[i];
  }

  // group g's scales (or offsets) of rows ns[first, first + 8) (past count: the last row's)
  __attribute__((target("avx2,f16c"))) __m256 scales(const S* base, const int64_t* ns, int count, int first,
                                                    int64_t g) const {
    const S* at = base + g * 16;
    if constexpr (std::is_same_v<S, float>) {
      alignas(32) float v[8];
      for (int i = 0; i < 8; i++) v[i] = at[soff(ns[std::min(first + i, count - 1)])];
      return _mm256_load_ps(v);
    } else {  // fp16 widens exactly
      alignas(16) uint16_t v[8];
      for (int i = 0; i < 8; i++) v[i] = at[soff(ns[std::min(first + i, count - 1)])].x;
      return _mm256_cvtph_ps(_mm_load_si128((const __m128i*)v));
    }
  }
};

at::Tensor rescore_top_k_blocks(const at::Tensor& y, const at::Tensor& x, const at::Tensor& w,
                                       const at::Tensor& sc, const at::Tensor& of, int64_t bits, int64_t group_size,
                                       int64_t k) {
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == at::kFloat, "rescore_top_k_blocks: y must be float32 [M, N]");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(0) == y.size(0),
              "rescore_top_k_blocks: x must be float32 [M, K]");
  TORCH_CHECK(bits == 4 || bits == 8, "rescore_top_k_blocks: code bits must be 4 or 8");
  TORCH_CHECK(w.dim() == 3 && w.size(2) == 64 && w.scalar_type() == at::kByte && w.is_contiguous(),
              "rescore_top_k_blocks: bad packed table");
  const int64_t L = w.size(1), K = x.size(1), G = sc.size(1);
  TORCH_CHECK(K <= L * (bits == 4 ? 8 : 4) && G * group_size >= K, "rescore_top_k_blocks: K larger than the table");
  TORCH_CHECK(sc.dim() == 3 && sc.size(0) == w.size(0) && sc.size(2) == 16 && sc.is_contiguous() &&
                  (sc.scalar_type() == at::kHalf || sc.scalar_type() == at::kFloat),
              "rescore_top_k_blocks: bad scales");
  const bool asym = of.numel() > 0;
  TORCH_CHECK(!asym || (of.sizes() == sc.sizes() && of.scalar_type() == sc.scalar_type() && of.is_contiguous()),
              "rescore_top_k_blocks: offsets must match the scales");
  TORCH_CHECK(y.size(1) <= w.size(0) * 16, "rescore_top_k_blocks: y wider than the table");
  const at::Tensor xc = x.contiguous();
  const float* xp = xc.data_ptr<float>();
  const int64_t M = x.size(0);
  std::vector<float> sx(M * G, 0.f);  // each row's sums of x per group, in k order
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < G; g++)
      for (int64_t kk = g * group_size; kk < std::min(K, (g + 1) * group_size); kk++) sx[m * G + g] += xp[m * K + kk];
  // lanes gather with int32 offsets
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && w.numel() <= INT32_MAX;
  auto run = [&](auto bits_tag, auto sp, auto op) {
    constexpr int BITS = decltype(bits_tag)::value;
    using S = std::remove_const_t<std::remove_pointer_t<decltype(sp)>>;
    return rescore_with(y, k, [&](int64_t m, const Entry* picks, int64_t count, float* o) {
      const BlockRows<BITS, S> rows{xp + m * K, sx.data() + m * G, K, w.data_ptr<uint8_t>(), L, sp, op, G, group_size};
      int64_t i = 0;
      if (avx2)
        for (int64_t ns[rows.LANES]; i < count; i += rows.LANES) {
          const int c = (int)std::min<int64_t>(rows.LANES, count - i);
          for (int j = 0; j < c; j++) ns[j] = picks[i + j].second;
          rows.lanes(ns, c, o);
        }
      for (; i < count; i++) o[picks[i].second] = rows.one(picks[i].second);
    });
  };
  auto by_bits = [&](auto sp, auto op) {
    return bits == 8 ? run(std::integral_constant<int, 8>{}, sp, op) : run(std::integral_constant<int, 4>{}, sp, op);
  };
  if (sc.scalar_type() == at::kHalf)
    return by_bits(sc.data_ptr<at::Half>(), asym ? of.data_ptr<at::Half>() : (const at::Half*)nullptr);
  return by_bits(sc.data_ptr<float>(), asym ? of.data_ptr<float>() : (const float*)nullptr);
}

}  // namespace llmrun_rescore
