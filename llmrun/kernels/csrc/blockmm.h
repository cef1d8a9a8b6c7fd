// What the block_mm op (blockmm.cpp) and its per-ISA kernel bodies (matmul_*.cpp, compiled from
// blockmm_body.inc) share. No torch headers: the bodies compile without them.
#pragma once
#include <cstdint>

namespace llmrun_kernels {

// One block_mm call (see blockmm_body.inc for the math and the layout).
struct BlockArgs {
  const int8_t* a;      // quantized activations [M][Kpad] (0 past K)
  const float* sa;      // activation scales per group [M][G]
  const int32_t* asum;  // activation sums per group [M][G]
  const uint8_t* w;     // packed panels
  int64_t wps;          // bytes per panel
  const void* sc;       // scales [NP][G][16]
  const void* of;       // offsets [NP][G][16], or nullptr (symmetric)
  bool f16;             // sc and of are fp16 (else fp32)
  int64_t M, N, Kpad;
  int G, lpg, bits;     // groups, 64-byte lines per group, code bits (4 or 8)
  void* out;            // [M][N], fp32 or bf16
  bool out_f32;
  int64_t pf;           // software prefetch distance in bytes (0: none)
};

// One tile's view of a call: R rows from `a`, C panels from `w`.
struct BlockTile {
  const int8_t* a;      // activation row 0 of the tile
  int64_t lda;
  const float* sa;      // row 0's group scales
  const int32_t* asum;  // row 0's group sums
  const uint8_t* w;     // panel 0 of the tile
  int64_t wps;
  const void* sc;       // panel 0's scales; of likewise (nullptr: symmetric)
  const void* of;
  int64_t sps;          // scale elements per panel (G * 16)
  bool f16;
  int G, lpg;
  float* out;           // [R][C*16], row stride ldo
  int64_t ldo;
  int64_t pf;
};

namespace avx512 { void block_run_panels(const BlockArgs& p, int64_t p_begin, int64_t p_end, int rt, int ct); }
namespace avxvnni { void block_run_panels(const BlockArgs& p, int64_t p_begin, int64_t p_end, int rt, int ct); }
namespace avxvnni_evex { void block_run_panels(const BlockArgs& p, int64_t p_begin, int64_t p_end, int rt, int ct); }
namespace avx2 { void block_run_panels(const BlockArgs& p, int64_t p_begin, int64_t p_end, int rt, int ct); }

}  // namespace llmrun_kernels
