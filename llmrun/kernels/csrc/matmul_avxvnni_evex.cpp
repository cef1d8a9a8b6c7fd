// The AVX-VNNI bodies' ymm code in EVEX encoding, for AVX512-VNNI + VL CPUs without AVX-VNNI
// (isa 1 there): int4 and block matmuls, one translation unit without torch headers.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#include "blockmm.h"
#include "int4mm.h"
#include "ymm.h"

namespace llmrun_kernels::avxvnni_evex {
#define TGT __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))
#define UNLO(w) _mm256_and_si256(_mm256_slli_epi16((w), 4), _mm256_set1_epi8((char)0xF0))
#define UNHI(w) _mm256_and_si256((w), _mm256_set1_epi8((char)0xF0))
#define DOT(acc, a, x) _mm256_dpbusd_epi32((acc), (a), (x))
#define DOT2(acc, a0, x0, a1, x1) _mm256_dpbusd_epi32(_mm256_dpbusd_epi32((acc), (a0), (x0)), (a1), (x1))
#define WSCALE 16
#define WSHIFT 4
#include "int4mm_body.inc"
#define DOT8(acc, w, a) DOT(acc, w, a)
#include "blockmm_body.inc"
}  // namespace llmrun_kernels::avxvnni_evex
