// The portable attention bodies (no target: what the compiler vectorizes for any x86-64),
// one translation unit without torch headers.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

#include <ATen/Parallel.h>

#include "attention.h"

namespace llmrun_attention {

#define ATTN_BODY_NS baseline
#define ATTN_GROUP 1  // query heads per pass over k and v (16 xmm: no room for more)
#include "attention_body.inc"
#define PF_W 4
#define PF_QK_R 4
#define PF_QK_C 2
#define PF_PV_R 4
#define PF_PV_C 2
#include "prefill_body.inc"

// the entry points attention.cpp calls (declared in attention.h without a target attribute)
namespace baseline {
void decode_heads(const Args& a, int64_t b, int64_t h0, int64_t count, float* scores) {
  row_heads(a, b, h0, count, scores);
}
void prefill_run(const PrefillArgs& a) { prefill::run(a); }
}  // namespace baseline

}  // namespace llmrun_attention
