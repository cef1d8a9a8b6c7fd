// The AVX512 attention bodies (decode, prefill, and prefill in bf16 products for AVX512-BF16
// CPUs), one translation unit without torch headers.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>  // at::parallel_for in the prefill body

#include "attention.h"

namespace llmrun_attention {

#define ATTN_BODY_NS avx512
#define ATTN_GROUP 4  // query heads per pass over k and v: 4 x 4 sums + 4 k rows + q in 32 ymm
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

// the entry points attention.cpp calls (declared in attention.h without a target attribute)
namespace avx512 {
void decode_heads(const Args& a, int64_t b, int64_t h0, int64_t count, float* scores) {
  row_heads(a, b, h0, count, scores);
}
void prefill_run(const PrefillArgs& a) { prefill::run(a); }
void prefill_run_bf16(const PrefillArgs& a) { prefill::run_bf16(a); }
}  // namespace avx512

}  // namespace llmrun_attention
