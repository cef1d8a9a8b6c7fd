// The AVX2 + FMA attention bodies (decode and prefill), one translation unit without torch headers.
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

#define ATTN_BODY_NS avx2
#define ATTN_GROUP 2  // query heads per pass over k and v: 2 x 4 sums + 4 k rows + q in 16 ymm
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

// the entry points attention.cpp calls (declared in attention.h without a target attribute)
namespace avx2 {
void decode_heads(const Args& a, int64_t b, int64_t h0, int64_t count, float* scores) {
  row_heads(a, b, h0, count, scores);
}
void prefill_run(const PrefillArgs& a) { prefill::run(a); }
}  // namespace avx2

}  // namespace llmrun_attention
