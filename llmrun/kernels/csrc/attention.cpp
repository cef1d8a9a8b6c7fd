// Attention over the filled part of a static KV cache: decode_attention (one query, the
// body in attention_body.inc) and prefill_attention (a chunk of queries, prefill_body.inc;
// its operands are described above it, below).
//
// The cache is laid out in slots, one per sequence: k, v (slots, Hkv, S, D). Row b of a call
// is a sequence in slot slots[b]; its query t sits at position pos[b][t], and the slot holds
// S >= pos + 1 positions, of which only [start, pos] are attended (start = pos - window + 1
// for sliding-window layers, else 0). Masked code over the whole cache reads all S positions
// every step; these kernels read positions and slots at run time and touch only the
// positions that count, with static tensor shapes (one compiled step serves every position
// and every mix of sequence lengths).
//
// decode_attention:
//   q      (B, H, 1, D)        fp32 or bf16
//   k, v   (slots, Hkv, S, D)  fp32 or bf16, last dim contiguous; H % Hkv == 0 (grouped queries)
//   input_pos (B,) int64       each row's position;  slots (B,) int64: each row's slot
//   out    (B, H, 1, D)        q's dtype
// scores = scale * q.k (then softcap * tanh(scores / softcap) when softcap > 0), softmax in
// float32 with the maximum subtracted, out = sum_j p_j v_j / sum_j p_j.
// Both bodies are compiled three times (AVX512, AVX2+FMA, baseline) and chosen at run time.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

namespace llmrun_attention {

// What both ops read of their operands: q, the cache's k and v, their strides (elements)
struct Operands {
  const void* q;
  const void* k;
  const void* v;
  int64_t H, rep, D;                  // query heads, query heads per kv head, head dim
  int64_t q_sb, q_sh;                 // q strides (batch, head)
  int64_t k_sb, k_sh, k_ss;           // k strides (batch, kv head, position)
  int64_t v_sb, v_sh, v_ss;
};

static Operands operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return {q.data_ptr(), k.data_ptr(), v.data_ptr(), q.size(1), q.size(1) / k.size(1), q.size(3),
          q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2)};
}

struct Args : Operands {
  void* out;
  bool q_bf16, kv_bf16;
  const int64_t* pos;                 // (B,) each row's position
  const int64_t* slot;                // (B,) each row's cache slot
  int64_t window;
  float scale, softcap;
  // attended positions of row b: [start, start + n)
  int64_t start(int64_t b) const { return window > 0 ? std::max<int64_t>(0, pos[b] - window + 1) : 0; }
  int64_t n(int64_t b) const { return pos[b] + 1 - start(b); }
};

struct PrefillArgs : Operands {
  void* out;                          // (B, H, T, D) contiguous, q's dtype
  bool q_bf16, kv_bf16;               // q and out are bf16 (else fp32); k and v are (a bf16 q: both)
  int64_t B, T;
  int64_t q_st;                       // q stride (query)
  const int64_t* pos;                 // (B, T) the queries' cache positions, contiguous
  const int64_t* slot;                // (B,) each row's cache slot
  float scale;
  int64_t window;
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
#define PF_W 16
#define PF_QK_R 8
#define PF_QK_C 2
#define PF_PV_R 8
#define PF_PV_C 3
#include "prefill_body.inc"
#include "prefill_bf16.inc"
#pragma GCC pop_options
#undef ATTN_BODY_NS
#undef PF_W
#undef PF_QK_R
#undef PF_QK_C
#undef PF_PV_R
#undef PF_PV_C

#define ATTN_BODY_NS avx2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include "attention_body.inc"
#define PF_W 8
#define PF_QK_R 6
#define PF_QK_C 2
#define PF_PV_R 4
#define PF_PV_C 3
#include "prefill_body.inc"
#pragma GCC pop_options
#undef ATTN_BODY_NS
#undef PF_W
#undef PF_QK_R
#undef PF_QK_C
#undef PF_PV_R
#undef PF_PV_C

#define ATTN_BODY_NS baseline
#include "attention_body.inc"
#define PF_W 4
#define PF_QK_R 4
#define PF_QK_C 2
#define PF_PV_R 4
#define PF_PV_C 2
#include "prefill_body.inc"
#undef ATTN_BODY_NS
#undef PF_W
#undef PF_QK_R
#undef PF_QK_C
#undef PF_PV_R
#undef PF_PV_C

// The best ISA this CPU runs: 2 AVX512, 1 AVX2 + FMA, 0 baseline
static int best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
  return 0;
}

static bool has_avx512bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
}

static int g_isa_cap = 2;  // tests lower it to run the narrower bodies (set_attention_isa)

static int attention_isa() { return std::min(best_isa(), g_isa_cap); }

// Whether prefill_attention's bf16_dots takes effect (the AVX512 body on an AVX512-BF16 CPU)
static bool prefill_bf16_dots_available() { return attention_isa() == 2 && has_avx512bf16(); }

// Caps the ISA both ops use (tests); returns the ISA now in use.
static int64_t set_attention_isa(int64_t cap) {
  g_isa_cap = (int)std::clamp<int64_t>(cap, 0, 2);
  return attention_isa();
}

// What both ops ask of their operands: q (B, H, T, D), k and v (slots, Hkv, S, D), H % Hkv == 0,
// input_pos (B, T) (decode: (B,) or (B, 1)) and slots (B,) int64 within the cache.
static void check_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos,
                           const at::Tensor& slots, const char* op) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes(), op, ": q must be (B, H, T, D), k and v (slots, Hkv, S, D)");
  TORCH_CHECK(k.size(3) == q.size(3), op, ": q and k disagree on D");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": H must be a multiple of Hkv");
  const int64_t B = q.size(0), T = q.size(2), S = k.size(2);
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.numel() == B * T && (pos.dim() == 2 || (pos.dim() == 1 && T == 1)),
              op, ": input_pos must be (B, T) int64 positions");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.numel() == B, op, ": slots must be (B,) int64");
  const int64_t* p = pos.data_ptr<int64_t>();
  const int64_t* s = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; b++) {
    TORCH_CHECK(s[b] >= 0 && s[b] < k.size(0), op, ": slot ", s[b], " outside the cache of ", k.size(0), " slots");
    for (int64_t t = 0; t < T; t++)
      TORCH_CHECK(p[b * T + t] >= 0 && p[b * T + t] < S, op, ": position ", p[b * T + t], " outside the cache of ", S);
  }
}

static at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& input_pos, const at::Tensor& slots, double scale, double softcap,
                                   int64_t window) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "decode_attention: q must be (B, H, 1, D)");
  const at::Tensor pos_c = input_pos.contiguous(), slots_c = slots.contiguous();
  check_operands(q, k, v, pos_c, slots_c, "decode_attention");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && q.stride(3) == 1, "decode_attention: last dims must be contiguous");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "decode_attention: k and v dtypes differ");
  for (const at::Tensor* t : {&q, &k})
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16,
                "decode_attention: tensors must be fp32 or bf16");
  TORCH_CHECK(q.size(3) <= 512, "decode_attention: head_dim above 512");
  at::Tensor out = at::empty(q.sizes(), q.options());
  Args a;
  static_cast<Operands&>(a) = operands(q, k, v);
  a.out = out.data_ptr();
  a.q_bf16 = q.scalar_type() == at::kBFloat16;
  a.kv_bf16 = k.scalar_type() == at::kBFloat16;
  a.pos = pos_c.data_ptr<int64_t>();
  a.slot = slots_c.data_ptr<int64_t>();
  a.window = window;
  a.scale = (float)scale;
  a.softcap = (float)softcap;
  const int isa = attention_isa();
  void (*head)(const Args&, int64_t, float*) =
      isa == 2 ? avx512::one_head : isa == 1 ? avx2::one_head : baseline::one_head;
  const int64_t B = q.size(0), heads = B * a.H;
  int64_t n_max = 1, n_sum = 0;
  for (int64_t b = 0; b < B; b++) n_max = std::max(n_max, a.n(b)), n_sum += a.n(b);
  // one thread for small work: a threaded region costs more than ~64K multiply-adds
  const int64_t per_head = std::max<int64_t>(1, n_sum / std::max<int64_t>(1, B) * a.D * 2);
  const int64_t grain = std::max<int64_t>(1, (int64_t)(1 << 16) / per_head);
  at::parallel_for(0, heads, grain, [&](int64_t b, int64_t e) {
    std::vector<float> scores(n_max);
    for (int64_t i = b; i < e; i++) head(a, i, scores.data());
  });
  return out;
}

// Attention of T queries (a prefill chunk) over a static KV cache (prefill_body.inc): per
// kv head and block of queries, only the cache positions some query of the block sees are
// read, in slices, with a running softmax; each query's scores beyond what it sees are
// dropped before the exponential. It replaced torch's fused CPU attention called per block
// of 64 queries with a mask (MKL sgemm on narrow heads); T = 512 over a 512-slot cache,
// 2 threads, ms per layer, torch's -> this: SmolLM2 shapes (9 heads, 3 kv heads, D 64)
// 4.3 -> 2.0, Gemma 3 270M shapes (4 heads, 1 kv head, D 256) 5.1 -> 3.3.
//   q      (B, H, T, D)        fp32 or bf16, any strides
//   k, v   (slots, Hkv, S, D)  q's dtype, or bf16 beside an fp32 q; last dim contiguous; H % Hkv == 0
//   input_pos (B, T) int64     the queries' cache positions (each in [0, S))
//   slots  (B,) int64          each row's cache slot
//   out    (B, H, T, D)
// Query t of row b sees position j of its slot iff j <= pos[b][t] and (window == 0 or
// j > pos[b][t] - window).
// bf16_dots: fp32 operands multiplied in bf16 with fp32 sums (prefill_bf16.inc) where
// prefill_bf16_dots_available() and the cache is fp32; otherwise ignored.
// Positions past a row's last are never read; those between the lowest position some query
// of a work item sees and its last must hold finite values (as a cache filled in order
// does): a query's weight 0 times an inf there would still be NaN.
static at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& input_pos, const at::Tensor& slots, double scale, int64_t window,
                                    bool bf16_dots) {
  TORCH_CHECK(q.dim() == 4, "prefill_attention: q must be (B, H, T, D)");
  const at::Tensor pos_t = input_pos.contiguous(), slots_c = slots.contiguous();
  check_operands(q, k, v, pos_t, slots_c, "prefill_attention");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "prefill_attention: k and v dtypes differ");
  for (const at::Tensor* t : {&q, &k})
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16,
                "prefill_attention: tensors must be fp32 or bf16");
  TORCH_CHECK(q.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16,
              "prefill_attention: a bf16 q needs a bf16 cache");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "prefill_attention: k and v last dims must be contiguous");
  const int64_t T = q.size(2), S = k.size(2);
  TORCH_CHECK(S <= INT32_MAX, "prefill_attention: a cache of over 2^31 positions");  // lanes hold int32
  const int64_t* pos = pos_t.data_ptr<int64_t>();
  const at::Tensor qc = q.stride(3) == 1 ? q : q.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) return out;
  PrefillArgs a;
  static_cast<Operands&>(a) = operands(qc, k, v);
  a.out = out.data_ptr();
  a.q_bf16 = q.scalar_type() == at::kBFloat16;
  a.kv_bf16 = k.scalar_type() == at::kBFloat16;
  a.B = q.size(0);
  a.T = T;
  a.q_st = qc.stride(2);
  a.pos = pos;
  a.slot = slots_c.data_ptr<int64_t>();
  a.scale = (float)scale;
  a.window = window;
  const int isa = attention_isa();
  if (bf16_dots && !a.q_bf16 && !a.kv_bf16 && prefill_bf16_dots_available()) avx512::prefill::run_bf16(a);
  else if (isa == 2) avx512::prefill::run(a);
  else if (isa == 1) avx2::prefill::run(a);
  else baseline::prefill::run(a);
  return out;
}

}  // namespace llmrun_attention

TORCH_LIBRARY_FRAGMENT(llmrun, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor input_pos, Tensor slots, float scale, "
        "float softcap, int window) -> Tensor");
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, Tensor input_pos, Tensor slots, float scale, "
        "int window, bool bf16_dots=False) -> Tensor");
  m.def("set_attention_isa(int cap) -> int", &llmrun_attention::set_attention_isa);
  m.def("prefill_bf16_dots_available() -> bool", &llmrun_attention::prefill_bf16_dots_available);
}

TORCH_LIBRARY_IMPL(llmrun, CPU, m) {
  m.impl("decode_attention", &llmrun_attention::decode_attention);
  m.impl("prefill_attention", &llmrun_attention::prefill_attention);
}
