// Single-query attention over the filled part of a static KV cache (decode steps).
//
// A decode step's query sits at position p; the cache holds S >= p + 1 positions, of which
// only [start, p] are attended (start = p - window + 1 for sliding-window layers, else 0).
// Masked code over the whole cache reads all S positions every step; this kernel reads the
// position from input_pos at run time and touches only the p + 1 - start that count, with
// static tensor shapes (one compiled decode step serves every position).
//
//   q      (B, H, 1, D)    fp32 or bf16
//   k, v   (B, Hkv, S, D)  fp32 or bf16, last dim contiguous; H % Hkv == 0 (grouped queries)
//   out    (B, H, 1, D)    q's dtype
// scores = scale * q.k (then softcap * tanh(scores / softcap) when softcap > 0), softmax in
// float32 with the maximum subtracted, out = sum_j p_j v_j / sum_j p_j.
// The body is compiled three times (AVX512, AVX2+FMA, baseline) and chosen at run time.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace llmrun_attention {

struct Args {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  bool q_bf16, kv_bf16;
  int64_t H, rep, D;
  int64_t q_sb, q_sh;                 // q strides (batch, head), elements
  int64_t k_sb, k_sh, k_ss;           // k strides (batch, kv head, position)
  int64_t v_sb, v_sh, v_ss;
  int64_t start, n;                   // attended positions [start, start + n)
  float scale, softcap;
};

static inline float bf16_to_f(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even, as torch does
  return (uint16_t)(u >> 16);
}

#define ATTN_BODY_NS avx512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx2")
#include "attention_body.inc"
#pragma GCC pop_options
#undef ATTN_BODY_NS

#define ATTN_BODY_NS avx2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include "attention_body.inc"
#pragma GCC pop_options
#undef ATTN_BODY_NS

#define ATTN_BODY_NS baseline
#include "attention_body.inc"
#undef ATTN_BODY_NS

// What both ops ask of their operands: q (B, H, T, D), k and v (B, Hkv, S, D), H % Hkv == 0.
static void check_cache_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes(), op, ": q must be (B, H, T, D), k and v (B, Hkv, S, D)");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), op, ": q and k disagree on B or D");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": H must be a multiple of Hkv");
}

static void check_position(int64_t pos, int64_t S, const char* op) {
  TORCH_CHECK(pos >= 0 && pos < S, op, ": position ", pos, " outside the cache of ", S);
}

static at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& input_pos, double scale, double softcap, int64_t window) {
  check_cache_shapes(q, k, v, "decode_attention");
  TORCH_CHECK(q.size(2) == 1, "decode_attention: q must be (B, H, 1, D)");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && q.stride(3) == 1, "decode_attention: last dims must be contiguous");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "decode_attention: k and v dtypes differ");
  for (const at::Tensor* t : {&q, &k})
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16,
                "decode_attention: tensors must be fp32 or bf16");
  TORCH_CHECK(q.size(3) <= 512, "decode_attention: head_dim above 512");
  TORCH_CHECK(input_pos.numel() == 1 && input_pos.scalar_type() == at::kLong, "decode_attention: one int64 position");
  const int64_t S = k.size(2);
  const int64_t pos = *input_pos.contiguous().data_ptr<int64_t>();
  check_position(pos, S, "decode_attention");
  at::Tensor out = at::empty(q.sizes(), q.options());
  Args a;
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.out = out.data_ptr();
  a.q_bf16 = q.scalar_type() == at::kBFloat16;
  a.kv_bf16 = k.scalar_type() == at::kBFloat16;
  a.H = q.size(1);
  a.rep = q.size(1) / k.size(1);
  a.D = q.size(3);
  a.q_sb = q.stride(0);
  a.q_sh = q.stride(1);
  a.k_sb = k.stride(0);
  a.k_sh = k.stride(1);
  a.k_ss = k.stride(2);
  a.v_sb = v.stride(0);
  a.v_sh = v.stride(1);
  a.v_ss = v.stride(2);
  a.start = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
  a.n = pos + 1 - a.start;
  a.scale = (float)scale;
  a.softcap = (float)softcap;
  __builtin_cpu_init();
  void (*head)(const Args&, int64_t, float*) = baseline::one_head;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    head = avx512::one_head;
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    head = avx2::one_head;
  const int64_t heads = q.size(0) * a.H;
  // one thread for small work: a threaded region costs more than ~64K multiply-adds
  const int64_t grain = std::max<int64_t>(1, (int64_t)(1 << 16) / std::max<int64_t>(1, a.n * a.D * 2));
  at::parallel_for(0, heads, grain, [&](int64_t b, int64_t e) {
    std::vector<float> scores(a.n);
    for (int64_t i = b; i < e; i++) head(a, i, scores.data());
  });
  return out;
}

// Attention of T queries (a prefill chunk) over a static KV cache, in blocks of PREFILL_BLOCK
// queries: each block reads only the cache positions its queries can see, [lo, hi), with
// hi = its last position + 1 and lo = 0 (or its first position - window + 1), and calls
// torch's fused CPU attention on that slice with the block's causal/window mask. Masked
// attention over the whole cache computes all T x S scores; this computes about
// T x (T / 2 + filled positions) and none past the last position (measured on Gemma 3
// shapes, T = 512, eager: 6.2 -> 4.5 ms per layer with a 512-slot cache, 12.4 -> 4.7 ms
// with 1024 slots).
//   q      (B, H, T, D)    fp32 or bf16
//   k, v   (B, Hkv, S, D)  q's dtype; H % Hkv == 0
//   input_pos (T,) int64   the queries' cache positions (each in [0, S))
//   out    (B, H, T, D)
// Query t sees position j iff j <= pos[t] and (window == 0 or j > pos[t] - window).
static constexpr int64_t PREFILL_BLOCK = 64;

static at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& input_pos, double scale, int64_t window) {
  check_cache_shapes(q, k, v, "prefill_attention");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "prefill_attention: dtypes differ");
  const int64_t T = q.size(2), S = k.size(2);
  TORCH_CHECK(input_pos.dim() == 1 && input_pos.numel() == T && input_pos.scalar_type() == at::kLong,
              "prefill_attention: input_pos must be T int64 positions");
  const at::Tensor pos_t = input_pos.contiguous();
  const int64_t* pos = pos_t.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; t++) check_position(pos[t], S, "prefill_attention");
  at::Tensor out = at::empty(q.sizes(), q.options());
  const bool gqa = q.size(1) != k.size(1);
  for (int64_t t0 = 0; t0 < T; t0 += PREFILL_BLOCK) {
    const int64_t tb = std::min(PREFILL_BLOCK, T - t0);
    int64_t lo = S, hi = 0;
    for (int64_t t = t0; t < t0 + tb; t++) {
      lo = std::min(lo, window > 0 ? std::max<int64_t>(0, pos[t] - window + 1) : 0);
      hi = std::max(hi, pos[t] + 1);
    }
    at::Tensor mask = at::empty({tb, hi - lo}, at::kBool);  // (tb, L): true where attended
    bool* m = mask.data_ptr<bool>();
    for (int64_t i = 0; i < tb; i++) {
      const int64_t p = pos[t0 + i];
      for (int64_t j = lo; j < hi; j++)
        m[i * (hi - lo) + (j - lo)] = j <= p && (window <= 0 || j > p - window);
    }
    at::Tensor block = at::scaled_dot_product_attention(
        q.narrow(2, t0, tb), k.narrow(2, lo, hi - lo), v.narrow(2, lo, hi - lo), mask,
        /*dropout_p=*/0.0, /*is_causal=*/false, scale, gqa);
    out.narrow(2, t0, tb).copy_(block);
  }
  return out;
}

}  // namespace llmrun_attention

TORCH_LIBRARY_FRAGMENT(llmrun, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor input_pos, float scale, float softcap, "
        "int window) -> Tensor");
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, Tensor input_pos, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmrun, CPU, m) {
  m.impl("decode_attention", &llmrun_attention::decode_attention);
  m.impl("prefill_attention", &llmrun_attention::prefill_attention);
}
