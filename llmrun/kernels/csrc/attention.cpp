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
// Both bodies are compiled three times (AVX512, AVX2+FMA, baseline: attention_*.cpp) and chosen at run time.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

#include "attention.h"
#include "bodies.h"
#include "ops.h"

namespace llmrun_attention {

static Operands operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return {q.data_ptr(), k.data_ptr(), v.data_ptr(), q.size(1), q.size(1) / k.size(1), q.size(3),
          q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2)};
}

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

// The bodies of attention ISA 2 (the AVX512 set) or 1 (AVX2's), loaded: native.py loads the
// best one with the ops and the other on demand
static const llmrun_kernels::Bodies& isa_bodies(int isa) {
  using namespace llmrun_kernels;
  const Bodies& b = bodies(isa == 2 ? BODIES_AVX512 : BODIES_AVX2);
  TORCH_CHECK(b.decode_heads != nullptr, "attention: the bodies of attention isa ", isa,
              " are not loaded (native.load_bodies loads them)");
  return b;
}

static int g_isa_cap = 2;  // tests lower it to run the narrower bodies (set_attention_isa)

// the ISA both ops use: the best this CPU runs, at most the cap, whose bodies are loaded
static int attention_isa() {
  int isa = std::min(best_isa(), g_isa_cap);
  while (isa > 0 && llmrun_kernels::bodies(isa == 2 ? llmrun_kernels::BODIES_AVX512 : llmrun_kernels::BODIES_AVX2)
                            .decode_heads == nullptr)
    isa--;
  return isa;
}

// Whether prefill_attention's bf16_dots takes effect (the AVX512 body on an AVX512-BF16 CPU)
bool prefill_bf16_dots_available() { return attention_isa() == 2 && has_avx512bf16(); }

// Caps the ISA both ops use (tests); returns the ISA now in use.
int64_t set_attention_isa(int64_t cap) {
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

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
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
  at::Tensor out = empty_cpu(q.sizes(), q.scalar_type());
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
  void (*heads)(const Args&, int64_t, int64_t, int64_t, float*) =
      isa == 0 ? baseline::decode_heads : isa_bodies(isa).decode_heads;
  const int64_t B = q.size(0), Hkv = k.size(1);
  int64_t n_max = 1, n_sum = 0;
  for (int64_t b = 0; b < B; b++) n_max = std::max(n_max, a.n(b)), n_sum += a.n(b);
  // a work item: `per_item` query heads of one row and kv head, which share each k and v row
  // read; the kv heads' query heads are split into smaller items while there are fewer items
  // than threads
  const int64_t threads = at::get_num_threads();
  int64_t per_item = a.rep;
  while (per_item > 1 && B * Hkv * ((a.rep + per_item - 1) / per_item) < threads) per_item = (per_item + 1) / 2;
  const int64_t chunks = (a.rep + per_item - 1) / per_item, items = B * Hkv * chunks;
  // one thread for small work: a threaded region costs more than ~64K multiply-adds
  const int64_t work = std::max<int64_t>(1, n_sum / std::max<int64_t>(1, B) * a.D * 2 * per_item);
  const int64_t grain = std::max<int64_t>(1, (int64_t)(1 << 16) / work);
  at::parallel_for(0, items, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> scores(decode_scores_room(n_max) * std::min(per_item, MAX_DECODE_GROUP));
    for (int64_t i = lo; i < hi; i++) {
      const int64_t b = i / (Hkv * chunks), g = i / chunks % Hkv, c = i % chunks;
      const int64_t h0 = g * a.rep + c * per_item;
      heads(a, b, h0, std::min(per_item, (g + 1) * a.rep - h0), scores.data());
    }
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
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
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
  at::Tensor out = empty_cpu(q.sizes(), q.scalar_type());
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
  if (bf16_dots && !a.q_bf16 && !a.kv_bf16 && prefill_bf16_dots_available()) isa_bodies(2).prefill_run_bf16(a);
  else if (isa == 0) baseline::prefill_run(a);
  else isa_bodies(isa).prefill_run(a);
  return out;
}

}  // namespace llmrun_attention
