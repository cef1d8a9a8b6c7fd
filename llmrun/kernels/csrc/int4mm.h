// What the int4 matmul's op (int4mm.cpp) and its per-ISA kernel bodies (matmul_*.cpp, compiled
// from int4mm_body.inc) share. No torch headers: the bodies compile without them.
#pragma once
#include <cstdint>
#include <cstring>

namespace llmrun_kernels {

// One int4_mm / int8_mm call (see int4mm_body.inc for the math and the layout).
struct RunArgs {
  const uint8_t* a;   // quantized activations [M][Kpad], a_u = a + 128
  const float* sa;    // activation scales [M]
  const uint8_t* w;   // packed panels
  int64_t wps;        // bytes per panel (Kpad / 2 * 16)
  const void* sc;
  bool sf16;
  const void* corr;
  int64_t M, N, Kpad;
  int G, lpg;
  bool grouped;
  bool int8;
  void* out;
  bool out_f32;
  int64_t pf;
};

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even, as torch does
  return (uint16_t)(u >> 16);
}

// Panels [p_begin, p_end) for all M rows, in tiles of up to rt rows x ct panels; one per ISA
// (isa 0: avx512, isa 1: avxvnni or avxvnni_evex, isa 2: avx2)
namespace avx512 { void run_panels(const RunArgs& p, int64_t p_begin, int64_t p_end, int rt, int ct); }
namespace avxvnni { void run_panels(const RunArgs& p, int64_t p_begin, int64_t p_end, int rt, int ct); }
namespace avxvnni_evex { void run_panels(const RunArgs& p, int64_t p_begin, int64_t p_end, int rt, int ct); }
namespace avx2 { void run_panels(const RunArgs& p, int64_t p_begin, int64_t p_end, int rt, int ct); }

}  // namespace llmrun_kernels
