// Registers llmrun's ops (torch.ops.llmrun.*; their fake implementations: native.py). The only
// file that includes torch/library.h: the others compile against ops.h's lighter headers.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(llmrun, m) {
  m.def("int4_mm(Tensor x, Tensor w, Tensor sc, Tensor corr, int group_size, int K, int N, int isa) -> Tensor");
  m.def("int8_mm(Tensor x, Tensor w, Tensor sc, Tensor corr, int K, int N, int isa) -> Tensor");
  m.def("quant_act(Tensor x, int Kpad) -> (Tensor, Tensor)");
  m.def("isa_support() -> int", &llmrun_kernels::isa_support);
  m.def("load_bodies(str path, int set) -> ()", &llmrun_kernels::load_bodies);
  m.def("block_mm(Tensor x, Tensor w, Tensor sc, Tensor of, int bits, int group_size, int K, int N, int isa) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor input_pos, Tensor slots, float scale, "
        "float softcap, int window) -> Tensor");
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, Tensor input_pos, Tensor slots, float scale, "
        "int window, bool bf16_dots=False) -> Tensor");
  m.def("set_attention_isa(int cap) -> int", &llmrun_attention::set_attention_isa);
  m.def("prefill_bf16_dots_available() -> bool", &llmrun_attention::prefill_bf16_dots_available);
  m.def("rescore_top_k(Tensor y, Tensor a, Tensor sa, Tensor q, Tensor sc, int k) -> Tensor");
  m.def("rescore_top_k_blocks(Tensor y, Tensor x, Tensor codes, Tensor sc, Tensor of, int bits, int group_size, int k) -> Tensor");
  m.def("int4_group_search(Tensor w, int group_size) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llmrun, CPU, m) {
  m.impl("int4_mm", &llmrun_kernels::int4_mm);
  m.impl("int8_mm", &llmrun_kernels::int8_mm);
  m.impl("quant_act", &llmrun_kernels::quant_act);
  m.impl("block_mm", &llmrun_kernels::block_mm);
  m.impl("decode_attention", &llmrun_attention::decode_attention);
  m.impl("prefill_attention", &llmrun_attention::prefill_attention);
  m.impl("rescore_top_k", &llmrun_rescore::rescore_top_k);
  m.impl("rescore_top_k_blocks", &llmrun_rescore::rescore_top_k_blocks);
  m.impl("int4_group_search", &llmrun_quantize::int4_group_search);
}
