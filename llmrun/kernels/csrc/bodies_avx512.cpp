// The avx512 body set's entry point (matmul_avx512.cpp, attention_avx512.cpp): what
// load_bodies (bodies.cpp) finds.
#include "bodies.h"

extern "C" void llmrun_bodies_avx512(llmrun_kernels::Bodies* out) {
  out->run_panels = llmrun_kernels::avx512::run_panels;
  out->block_run_panels = llmrun_kernels::avx512::block_run_panels;
  out->decode_heads = llmrun_attention::avx512::decode_heads;
  out->prefill_run = llmrun_attention::avx512::prefill_run;
  out->prefill_run_bf16 = llmrun_attention::avx512::prefill_run_bf16;
}
