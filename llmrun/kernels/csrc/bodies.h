// The kernel bodies of one ISA as the ops reach them: function pointers, filled by the
// load_bodies op from the shared object that holds the set (the ops' own library for the sets
// this CPU runs by default, a library of its own for the others, built when first asked for:
// native.py). Each set's library exports llmrun_bodies_<set> (bodies_<set>.cpp).
#pragma once
#include "attention.h"
#include "blockmm.h"
#include "int4mm.h"

namespace llmrun_kernels {

enum BodySet : int { BODIES_AVX512 = 0, BODIES_AVXVNNI = 1, BODIES_AVXVNNI_EVEX = 2, BODIES_AVX2 = 3, BODY_SETS = 4 };

struct Bodies {  // null where the set has no such body (or is not loaded)
  void (*run_panels)(const RunArgs&, int64_t, int64_t, int, int) = nullptr;
  void (*block_run_panels)(const BlockArgs&, int64_t, int64_t, int, int) = nullptr;
  void (*decode_heads)(const llmrun_attention::Args&, int64_t, int64_t, int64_t, float*) = nullptr;
  void (*prefill_run)(const llmrun_attention::PrefillArgs&) = nullptr;
  void (*prefill_run_bf16)(const llmrun_attention::PrefillArgs&) = nullptr;
};

// the set's bodies as loaded so far (bodies.cpp)
const Bodies& bodies(int set);

}  // namespace llmrun_kernels
