// Rescoring a wide layer's largest outputs (RescoredLinear in modules.py): y holds an
// approximate x @ W^T (an int4 copy's); each row's k largest entries are recomputed from the
// exact table, kept row-major (its neutral layout) so that a pick reads one row's bytes.
// rescore_top_k takes a per-channel int8 table (q int8 [N, K], sc fp32 [N]) and the quantized
// activations of quant_act (a uint8 [M, Kpad >= K] = a_int8 + 128, sa fp32 [M]):
//     out = y;  out[m, n] = float(sum_k a[m, k] q[n, k]) * (sc[n] * sa[m])   for n in top_k(y[m])
// bit for bit int8_mm's value on the same table (int4mm.cpp), and block_mm's for one group per
// row (its activations per group are quant_act's per row, its sum S - 128 A is sum a q, its
// scale product the same). rescore_top_k_blocks does the same against a block-quantized table
// (blocks.py's neutral codes, scales and offsets; the tied tables of GGUF files as shipped),
// from float activations.
// Per row a threshold from a sample, one pass over y collecting the entries above it, the k
// largest of those, then one row dot per pick. NaN entries are never picked.

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

// The entries of v[begin, end) >= t (NaN never is), appended to `out` in column order. Most
// entries are below t: the vector bodies compare 16 (8) at a time and visit only the hits.
static void collect_at_least_scalar(const float* v, int64_t begin, int64_t end, float t, std::vector<Entry>& out) {
  for (int64_t n = begin; n < end; n++)
    if (v[n] >= t) out.push_back({v[n], n});
}

__attribute__((target("avx512f"))) static void collect_at_least_avx512(const float* v, int64_t begin, int64_t end,
                                                                      float t, std::vector<Entry>& out) {
  const __m512 tv = _mm512_set1_ps(t);
  int64_t n = begin;
  for (; n + 16 <= end; n += 16)
    for (uint32_t hits = _mm512_cmp_ps_mask(_mm512_loadu_ps(v + n), tv, _CMP_GE_OQ); hits; hits &= hits - 1) {
      const int64_t c = n + __builtin_ctz(hits);
      out.push_back({v[c], c});
    }
  collect_at_least_scalar(v, n, end, t, out);
}

__attribute__((target("avx2"))) static void collect_at_least_avx2(const float* v, int64_t begin, int64_t end, float t,
                                                                 std::vector<Entry>& out) {
  const __m256 tv = _mm256_set1_ps(t);
  int64_t n = begin;
  for (; n + 8 <= end; n += 8)
    for (uint32_t hits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v + n), tv, _CMP_GE_OQ)); hits;
         hits &= hits - 1) {
      const int64_t c = n + __builtin_ctz(hits);
      out.push_back({v[c], c});
    }
  collect_at_least_scalar(v, n, end, t, out);
}

using Collect = void (*)(const float*, int64_t, int64_t, float, std::vector<Entry>&);

static Collect collect_at_least() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return collect_at_least_avx512;
  return __builtin_cpu_supports("avx2") ? collect_at_least_avx2 : collect_at_least_scalar;
}

// sum_k (a[k] - 128) q[k] over one row of K codes
static int32_t row_dot_scalar(const uint8_t* a, const int8_t* q, int64_t K) {
  int32_t acc = 0;
  for (int64_t k = 0; k < K; k++) acc += ((int32_t)a[k] - 128) * (int32_t)q[k];
  return acc;
}

__attribute__((target("avx2"))) static int32_t row_dot_avx2(const uint8_t* a, const int8_t* q, int64_t K) {
  const __m256i half = _mm256_set1_epi16(128);
  __m256i acc = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {  // 16 products a pass, summed in pairs: |pair| <= 2 * 128 * 127
    const __m256i av = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(a + k))), half);
    const __m256i qv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(q + k)));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(av, qv));
  }
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s) + row_dot_scalar(a + k, q + k, K - k);
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
  const Collect collect = collect_at_least();
  // One row's picks, its k largest entries by (value, column): the entries at least a
  // threshold (top_k_threshold), collected in `parts` slices, then the k largest of those.
  auto picks = [&](int64_t m, int64_t parts) {
    const float* row = o + m * N;
    const float t = top_k_threshold(row, N, k);
    std::vector<std::vector<Entry>> found(parts);
    at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {  // inline inside the rows' parallel_for
      for (int64_t s = b; s < e; s++) collect(row, s * N / parts, (s + 1) * N / parts, t, found[s]);
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

at::Tensor rescore_top_k(const at::Tensor& y, const at::Tensor& a, const at::Tensor& sa, const at::Tensor& q,
                         const at::Tensor& sc, int64_t k) {
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == at::kFloat, "rescore_top_k: y must be float32 [M, N]");
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "rescore_top_k: q must be int8 [N, K]");
  const int64_t M = y.size(0), N = y.size(1), K = q.size(1);
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kByte && a.size(0) == M && a.size(1) >= K && a.is_contiguous(),
              "rescore_top_k: a must be uint8 [M, Kpad >= K] (quant_act)");
  TORCH_CHECK(sa.scalar_type() == at::kFloat && sa.numel() == M && sa.is_contiguous(), "rescore_top_k: bad sa");
  TORCH_CHECK(sc.scalar_type() == at::kFloat && sc.is_contiguous() && sc.numel() == q.size(0),
              "rescore_top_k: scales must be float32 [N]");
  TORCH_CHECK(N <= q.size(0), "rescore_top_k: y wider than the table");
  const int64_t Kpad = a.size(1);
  const uint8_t* ap = a.data_ptr<uint8_t>();
  const float* sap = sa.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  __builtin_cpu_init();
  const auto dot = __builtin_cpu_supports("avx2") ? row_dot_avx2 : row_dot_scalar;
  return rescore_with(y, k, [&](int64_t m, const Entry* picks, int64_t count, float* o) {
    for (int64_t i = 0; i < count; i++) {
      const int64_t n = picks[i].second;
      o[n] = (float)dot(ap + m * Kpad, qp + n * K, K) * (sp[n] * sap[m]);
    }
  });
}

// Rows of a block-quantized table (blocks.py's neutral layout: codes uint8 [N, RB] row-major,
// 4-bit codes two a byte with even k in the low nibble; scales and offsets fp32 [N, G]) against
// float x [K]: per group s * sum x (u - zero), or s * sum x u + o * sum x, in float32, each sum
// in k order (sx [G]: the groups' sums of x, the same for every row). A 4-byte word of a row
// holds KPW codes. With AVX2, 16 rows at a time, one per vector lane: each lane does its row's
// float operations in the same order (a multiply, then an add: no FMA), so both paths give the
// same bits.
template <int BITS>
struct BlockRows {
  const float* x;
  const float* sx;
  int64_t K;
  const uint8_t* w;
  int64_t RB;  // bytes per row
  const float* sc;
  const float* of;  // nullptr: symmetric
  int64_t G, gs;
  static constexpr int KPW = BITS == 4 ? 8 : 4;  // codes per 4-byte word
  static constexpr float ZERO_SYM = (float)(1 << (BITS - 1));

  static int code(uint32_t word, int j) { return (word >> (BITS * j)) & ((1 << BITS) - 1); }
  // word i of row n; a row's last word may be partial (its missing bytes read as 0)
  uint32_t word(int64_t n, int64_t i) const {
    uint32_t v = 0;
    std::memcpy(&v, w + n * RB + 4 * i, (size_t)std::min<int64_t>(4, RB - 4 * i));
    return v;
  }
  float finish(float total, float sw, int64_t n, int64_t g) const {
    const float s = sc[n * G + g];
    return of ? total + (s * sw + of[n * G + g] * sx[g]) : total + s * sw;
  }

  float one(int64_t n) const {
    const float zero = of ? 0.f : ZERO_SYM;
    float total = 0.f;
    for (int64_t g = 0; g < G; g++) {
      float sw = 0.f;
      for (int64_t k = g * gs; k < std::min(K, (g + 1) * gs); k++)
        sw += x[k] * ((float)code(word(n, k / KPW), (int)(k % KPW)) - zero);
      total = finish(total, sw, n, g);
    }
    return total;
  }

  // rows ns[0, count), count <= LANES: two vectors of 8 lanes (two add chains in flight)
  static constexpr int LANES = 16;
  __attribute__((target("avx2"))) void lanes(const int64_t* ns, int count, float* o) const {
    alignas(32) int32_t offs[LANES];
    for (int i = 0; i < LANES; i++) offs[i] = (int32_t)(ns[std::min(i, count - 1)] * RB);
    __m256i voff[2];
    for (int h = 0; h < 2; h++) voff[h] = _mm256_load_si256((const __m256i*)(offs + 8 * h));
    const __m256 zero = _mm256_set1_ps(of ? 0.f : ZERO_SYM);
    const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
    const int64_t whole = RB / 4;  // words every row holds in full
    __m256 total[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t g = 0; g < G; g++) {
      __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
      const int64_t k1 = std::min(K, (g + 1) * gs);
      for (int64_t k = g * gs; k < k1;) {
        const int64_t i = k / KPW;
        __m256i words[2];
        if (i < whole) {
          for (int h = 0; h < 2; h++) words[h] = _mm256_i32gather_epi32((const int*)(w + 4 * i), voff[h], 1);
        } else {  // a partial last word: read within each row
          alignas(32) uint32_t part[LANES];
          for (int l = 0; l < LANES; l++) part[l] = word(ns[std::min(l, count - 1)], i);
          for (int h = 0; h < 2; h++) words[h] = _mm256_load_si256((const __m256i*)(part + 8 * h));
        }
        for (int j = (int)(k % KPW); j < KPW && k < k1; j++, k++) {
          const __m256 xk = _mm256_set1_ps(x[k]);
          for (int h = 0; h < 2; h++) {
            const __m256i u = _mm256_and_si256(_mm256_srli_epi32(words[h], BITS * j), mask);
            const __m256 d = _mm256_sub_ps(_mm256_cvtepi32_ps(u), zero);
            acc[h] = _mm256_add_ps(acc[h], _mm256_mul_ps(xk, d));
          }
        }
      }
      // total + s * sw (+ o * sx), as finish() does per row
      const __m256 sxg = _mm256_set1_ps(sx[g]);
      for (int h = 0; h < 2; h++) {
        const __m256 part = _mm256_mul_ps(group_values(sc, ns, count, 8 * h, g), acc[h]);
        total[h] = _mm256_add_ps(total[h],
                                 of ? _mm256_add_ps(part, _mm256_mul_ps(group_values(of, ns, count, 8 * h, g), sxg))
                                    : part);
      }
    }
    alignas(32) float t[LANES];
    for (int h = 0; h < 2; h++) _mm256_store_ps(t + 8 * h, total[h]);
    for (int i = 0; i < count; i++) o[ns[i]] = t[i];
  }

  // group g's scales (or offsets) of rows ns[first, first + 8) (past count: the last row's)
  __attribute__((target("avx2"))) __m256 group_values(const float* base, const int64_t* ns, int count, int first,
                                                      int64_t g) const {
    alignas(32) float v[8];
    for (int i = 0; i < 8; i++) v[i] = base[ns[std::min(first + i, count - 1)] * G + g];
    return _mm256_load_ps(v);
  }
};

at::Tensor rescore_top_k_blocks(const at::Tensor& y, const at::Tensor& x, const at::Tensor& codes,
                                const at::Tensor& sc, const at::Tensor& of, int64_t bits, int64_t group_size,
                                int64_t k) {
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == at::kFloat, "rescore_top_k_blocks: y must be float32 [M, N]");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(0) == y.size(0),
              "rescore_top_k_blocks: x must be float32 [M, K]");
  TORCH_CHECK(bits == 4 || bits == 8, "rescore_top_k_blocks: code bits must be 4 or 8");
  const int64_t K = x.size(1), N = codes.size(0), G = (K + group_size - 1) / group_size;
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.size(1) == (bits == 4 ? (K + 1) / 2 : K),
              "rescore_top_k_blocks: codes must be uint8 [N, ceil(K/2)] (4 bits) or [N, K] (8 bits)");
  TORCH_CHECK(sc.dim() == 2 && sc.size(0) == N && sc.size(1) == G && sc.is_contiguous() &&
                  sc.scalar_type() == at::kFloat,
              "rescore_top_k_blocks: scales must be float32 [N, ceil(K / group_size)]");
  const bool asym = of.numel() > 0;
  TORCH_CHECK(!asym || (of.sizes() == sc.sizes() && of.scalar_type() == sc.scalar_type() && of.is_contiguous()),
              "rescore_top_k_blocks: offsets must match the scales");
  TORCH_CHECK(y.size(1) <= N, "rescore_top_k_blocks: y wider than the table");
  const at::Tensor xc = x.contiguous();
  const float* xp = xc.data_ptr<float>();
  const int64_t M = x.size(0);
  std::vector<float> sx(M * G, 0.f);  // each row's sums of x per group, in k order
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < G; g++)
      for (int64_t kk = g * group_size; kk < std::min(K, (g + 1) * group_size); kk++) sx[m * G + g] += xp[m * K + kk];
  // lanes gather with int32 offsets
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && codes.numel() <= INT32_MAX;
  const float* op = asym ? of.data_ptr<float>() : nullptr;
  auto run = [&](auto bits_tag) {
    constexpr int BITS = decltype(bits_tag)::value;
    return rescore_with(y, k, [&](int64_t m, const Entry* picks, int64_t count, float* o) {
      const BlockRows<BITS> rows{xp + m * K, sx.data() + m * G, K, codes.data_ptr<uint8_t>(), codes.size(1),
                                 sc.data_ptr<float>(), op, G, group_size};
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
  return bits == 8 ? run(std::integral_constant<int, 8>{}) : run(std::integral_constant<int, 4>{});
}

}  // namespace llmrun_rescore
