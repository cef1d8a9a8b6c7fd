// The avxvnni body set's entry point (matmul_avxvnni.cpp): what load_bodies (bodies.cpp) finds.
#include "bodies.h"

extern "C" void llmrun_bodies_avxvnni(llmrun_kernels::Bodies* out) {
  out->run_panels = llmrun_kernels::avxvnni::run_panels;
  out->block_run_panels = llmrun_kernels::avxvnni::block_run_panels;
}
