// The ops llmrun registers (ops.cpp), defined in int4mm.cpp, blockmm.cpp, attention.cpp,
// rescore.cpp and quantize.cpp. Only ATen's tensor headers: torch/library.h and the
// dispatcher's op headers (at::empty) cost seconds of every compile, so one file registers and
// tensors are made with ATen's CPU allocator (the ops are registered for CPU only).
#pragma once
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <tuple>

// A new uninitialized contiguous CPU tensor
inline at::Tensor empty_cpu(at::IntArrayRef sizes, at::ScalarType dtype) { return at::detail::empty_cpu(sizes, dtype); }

namespace llmrun_kernels {
void load_bodies(const std::string& path, int64_t set);
// the CPU's ISA bits (1 zmm VNNI, 2 ymm VNNI VEX, 4 ymm VNNI EVEX, 8 AVX2)
int64_t isa_support();
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sc, const at::Tensor& corr,
                   int64_t group_size, int64_t K, int64_t N, int64_t isa);
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sc, const at::Tensor& corr, int64_t K,
                   int64_t N, int64_t isa);
std::tuple<at::Tensor, at::Tensor> quant_act(const at::Tensor& x, int64_t Kpad);
at::Tensor block_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sc, const at::Tensor& of, int64_t bits,
                    int64_t group_size, int64_t K, int64_t N, int64_t isa);
}  // namespace llmrun_kernels

namespace llmrun_attention {
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& input_pos,
                            const at::Tensor& slots, double scale, double softcap, int64_t window);
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& input_pos,
                             const at::Tensor& slots, double scale, int64_t window, bool bf16_dots);
int64_t set_attention_isa(int64_t cap);
bool prefill_bf16_dots_available();
}  // namespace llmrun_attention

namespace llmrun_rescore {
at::Tensor rescore_top_k(const at::Tensor& y, const at::Tensor& a, const at::Tensor& sa, const at::Tensor& q,
                         const at::Tensor& sc, int64_t k);
at::Tensor rescore_top_k_blocks(const at::Tensor& y, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& sc,
                                const at::Tensor& of, int64_t bits, int64_t group_size, int64_t k);
}  // namespace llmrun_rescore

namespace llmrun_quantize {
std::tuple<at::Tensor, at::Tensor, at::Tensor> int4_group_search(const at::Tensor& w, int64_t group_size);
}  // namespace llmrun_quantize
