// The avxvnni_evex body set's entry point (matmul_avxvnni_evex.cpp): what load_bodies (bodies.cpp) finds.
#include "bodies.h"

extern "C" void llmrun_bodies_avxvnni_evex(llmrun_kernels::Bodies* out) {
  out->run_panels = llmrun_kernels::avxvnni_evex::run_panels;
  out->block_run_panels = llmrun_kernels::avxvnni_evex::block_run_panels;
}
