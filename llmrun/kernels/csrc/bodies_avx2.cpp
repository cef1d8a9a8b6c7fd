// The avx2 body set's entry point (matmul_avx2.cpp, attention_avx2.cpp): what
// load_bodies (bodies.cpp) finds.
#include "bodies.h"

extern "C" void llmrun_bodies_avx2(llmrun_kernels::Bodies* out) {
  out->run_panels = llmrun_kernels::avx2::run_panels;
  out->block_run_panels = llmrun_kernels::avx2::block_run_panels;
  out->decode_heads = llmrun_attention::avx2::decode_heads;
  out->prefill_run = llmrun_attention::avx2::prefill_run;
}
