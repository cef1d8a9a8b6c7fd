// Rescoring a wide layer's largest outputs (RescoredLinear in modules.py): y holds an
// approximate x @ W^T (an int4 copy's); each row's k largest entries are recomputed as int8_mm
// computes them (int4mm.cpp), from its int8 panel table (w uint8 [NP, K4, 64], byte 4c+j of
// line l is q[16p+c][4l+j] as int8; sc fp32 [NP*16]) and the same quantized activations
// (quant_act: a uint8 [M, K4*4] = a_int8 + 128, sa fp32 [M]):
//     out = y;  out[m, n] = float(sum_k a[m, k] q[n, k]) * (sc[n] * sa[m])   for n in top_k(y[m])
// bit for bit int8_mm's value.
// rescore_top_k_blocks does the same against a block-quantized table (block_mm's panels; the
// tied tables of GGUF files as shipped), from float activations.
// One pass over y with a k-entry min-heap per thread (almost every entry fails the compare
// with the heap's minimum), then one k-row dot per pick. NaN entries are never picked.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

namespace llmrun_rescore {

using Entry = std::pair<float, int64_t>;  // (value, column)

// Adds the entries of v[begin, end) that belong to the k largest seen so far to `heap`
// (a min-heap by value of at most k entries).
static void push_top(const float* v, int64_t begin, int64_t end, int64_t k, std::vector<Entry>& heap) {
  auto greater = std::greater<Entry>();
  for (int64_t n = begin; n < end; n++) {
    const float x = v[n];
    if ((int64_t)heap.size() == k) {
      if (!(x > heap.front().first)) continue;  // also drops NaN
      std::pop_heap(heap.begin(), heap.end(), greater);
      heap.back() = {x, n};
      std::push_heap(heap.begin(), heap.end(), greater);
    } else if (x == x) {
      heap.push_back({x, n});
      std::push_heap(heap.begin(), heap.end(), greater);
    }
  }
}

static int32_t row_dot(const uint8_t* a, const uint8_t* w, int64_t K4, int64_t n) {
  const int8_t* q = (const int8_t*)w + (n / 16) * K4 * 64 + (n % 16) * 4;  // line l at q + 64 l
  int32_t acc = 0;
  for (int64_t l = 0; l < K4; l++)
    for (int j = 0; j < 4; j++) acc += ((int32_t)a[4 * l + j] - 128) * (int32_t)q[64 * l + j];
  return acc;
}

// out = y with each row's k largest entries replaced by value(m, n) (a row of the exact table
// against row m's activations).
template <typename Value>
static at::Tensor rescore_with(const at::Tensor& y, int64_t k, const Value& value) {
  TORCH_CHECK(k >= 0, "rescore_top_k: k must be >= 0");
  const int64_t M = y.size(0), N = y.size(1);
  k = std::min(k, N);
  at::Tensor out = y.contiguous().clone();
  if (M == 0 || k == 0) return out;
  float* o = out.data_ptr<float>();
  // One row's picks: its columns split in `parts` slices, one heap each, merged to k.
  auto picks = [&](int64_t m, int64_t parts) {
    std::vector<std::vector<Entry>> heaps(parts);
    auto scan = [&](int64_t b, int64_t e) {
      for (int64_t s = b; s < e; s++) {
        heaps[s].reserve(k);
        push_top(o + m * N, s * N / parts, (s + 1) * N / parts, k, heaps[s]);
      }
    };
    at::parallel_for(0, parts, 1, scan);  // inline when called inside the rows' parallel_for
    std::vector<Entry> all;
    for (auto& h : heaps) all.insert(all.end(), h.begin(), h.end());
    if ((int64_t)all.size() > k) {
      std::nth_element(all.begin(), all.begin() + k, all.end(), std::greater<Entry>());
      all.resize(k);
    }
    return all;
  };
  auto rescore = [&](int64_t m, const std::vector<Entry>& chosen, int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) o[m * N + chosen[i].second] = value(m, chosen[i].second);
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

static at::Tensor rescore_top_k(const at::Tensor& y, const at::Tensor& a, const at::Tensor& sa, const at::Tensor& w,
                                const at::Tensor& sc, int64_t k) {
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
  return rescore_with(y, k, [&](int64_t m, int64_t n) {
    return (float)row_dot(ap + m * K4 * 4, wp, K4, n) * (sp[n] * sap[m]);
  });
}

// Row n of a block-quantized table (block_mm's panels, blockmm_body.inc) against float x [K]:
// per group s * sum x (u - zero), or s * sum x u + o * sum x, in float32.
template <int BITS, typename S>
static float block_row(const float* x, int64_t K, const uint8_t* w, int64_t L, const S* sc, const S* of, int64_t G,
                       int64_t gs, int64_t n) {
  const uint8_t* col = w + (n / 16) * L * 64 + (n % 16) * 4;  // line l at col + 64 l
  const int64_t soff = (n / 16) * G * 16 + n % 16;
  const float zero = of ? 0.f : (float)(1 << (BITS - 1));
  float total = 0.f;
  for (int64_t g = 0; g < G; g++) {
    float sw = 0.f, sx = 0.f;
    for (int64_t k = g * gs; k < std::min(K, (g + 1) * gs); k++) {
      int u;
      if constexpr (BITS == 8) {
        u = col[(k / 4) * 64 + k % 4];
      } else {
        const uint8_t byte = col[(k / 8) * 64 + (k % 8) % 4];
        u = (k % 8) < 4 ? (byte & 15) : (byte >> 4);
      }
      sw += x[k] * ((float)u - zero);
      sx += x[k];
    }
    const float s = static_cast<float>(sc[soff + g * 16]);
    total += of ? s * sw + static_cast<float>(of[soff + g * 16]) * sx : s * sw;
  }
  return total;
}

static at::Tensor rescore_top_k_blocks(const at::Tensor& y, const at::Tensor& x, const at::Tensor& w,
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
  const uint8_t* wp = w.data_ptr<uint8_t>();
  auto run = [&](auto sp, auto op) {
    if (bits == 8)
      return rescore_with(y, k, [&](int64_t m, int64_t n) { return block_row<8>(xp + m * K, K, wp, L, sp, op, G, group_size, n); });
    return rescore_with(y, k, [&](int64_t m, int64_t n) { return block_row<4>(xp + m * K, K, wp, L, sp, op, G, group_size, n); });
  };
  if (sc.scalar_type() == at::kHalf)
    return run(sc.data_ptr<at::Half>(), asym ? of.data_ptr<at::Half>() : (const at::Half*)nullptr);
  return run(sc.data_ptr<float>(), asym ? of.data_ptr<float>() : (const float*)nullptr);
}

}  // namespace llmrun_rescore

TORCH_LIBRARY_FRAGMENT(llmrun, m) {
  m.def("rescore_top_k(Tensor y, Tensor a, Tensor sa, Tensor w, Tensor sc, int k) -> Tensor");
  m.def("rescore_top_k_blocks(Tensor y, Tensor x, Tensor w, Tensor sc, Tensor of, int bits, int group_size, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmrun, CPU, m) {
  m.impl("rescore_top_k", &llmrun_rescore::rescore_top_k);
  m.impl("rescore_top_k_blocks", &llmrun_rescore::rescore_top_k_blocks);
}
