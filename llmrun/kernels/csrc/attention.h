// What the attention ops (attention.cpp) and their per-ISA bodies (attention_body.inc and
// prefill_body.inc, compiled in attention_avx512.cpp, attention_avx2.cpp and
// attention_baseline.cpp) share. No torch headers: the bodies compile without them.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

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

inline float bf16_to_f(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even, as torch does
  return (uint16_t)(u >> 16);
}

// The most query heads one pass of a decode body over k and v serves (ATTN_GROUP, per ISA)
constexpr int64_t MAX_DECODE_GROUP = 4;

// A decode head's room in the scores: its attended positions rounded up to whole 8-lane vectors
inline int64_t decode_scores_room(int64_t n) { return (n + 7) / 8 * 8; }

// The bodies' entry points, one namespace per ISA: query heads h0..h0+count-1 of row b of
// decode_attention, all of one kv head (scores: room for min(count, MAX_DECODE_GROUP) x
// decode_scores_room(the row's attended positions)) and a whole
// prefill_attention call (run_bf16: fp32 operands multiplied in bf16, AVX512-BF16 CPUs).
namespace avx512 {
void decode_heads(const Args& a, int64_t b, int64_t h0, int64_t count, float* scores);
void prefill_run(const PrefillArgs& a);
void prefill_run_bf16(const PrefillArgs& a);
}  // namespace avx512
namespace avx2 {
void decode_heads(const Args& a, int64_t b, int64_t h0, int64_t count, float* scores);
void prefill_run(const PrefillArgs& a);
}  // namespace avx2
namespace baseline {
void decode_heads(const Args& a, int64_t b, int64_t h0, int64_t count, float* scores);
void prefill_run(const PrefillArgs& a);
}  // namespace baseline

}  // namespace llmrun_attention
