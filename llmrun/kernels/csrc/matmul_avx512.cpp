// The AVX512-VNNI matmul bodies (int4 and block weights; zmm vpdpbusd, one 16-column panel per
// vector), one translation unit without torch headers.
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#include "blockmm.h"
#include "int4mm.h"

namespace llmrun_kernels::avx512 {
#define TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c,avx2")))
#define VPP 1
#define VI __m512i
#define VF __m512
#define LOADW(p) _mm512_loadu_si512((const void*)(p))
#define UNLO(w) _mm512_and_si512(_mm512_slli_epi16((w), 4), _mm512_set1_epi8((char)0xF0))
#define UNHI(w) _mm512_and_si512((w), _mm512_set1_epi8((char)0xF0))
#define DOT(acc, a, x) _mm512_dpbusd_epi32((acc), (a), (x))
#define DOT2(acc, a0, x0, a1, x1) _mm512_dpbusd_epi32(_mm512_dpbusd_epi32((acc), (a0), (x0)), (a1), (x1))
#define SET1I(x) _mm512_set1_epi32(x)
#define SET1F(x) _mm512_set1_ps(x)
#define ZEROI() _mm512_setzero_si512()
#define ZEROF() _mm512_setzero_ps()
#define ADDI(a, b) _mm512_add_epi32((a), (b))
#define SUBI(a, b) _mm512_sub_epi32((a), (b))
#define SLLI(a, n) _mm512_slli_epi32((a), (n))
#define CVT(a) _mm512_cvtepi32_ps(a)
#define FMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define FMS(a, b, c) _mm512_fmsub_ps((a), (b), (c))
#define MUL(a, b) _mm512_mul_ps((a), (b))
#define LOADF(p) _mm512_loadu_ps(p)
#define LOADI(p) _mm512_loadu_si512((const void*)(p))
#define LOADH(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p)))
#define STOREF(p, v) _mm512_storeu_ps((p), (v))
#define WSCALE 16
#define WSHIFT 4
#define RMAX 6
#define CMAX 4
#define GRMAX 4
#define GCMAX 3
#include "int4mm_body.inc"
#define U4LO(w) _mm512_and_si512((w), _mm512_set1_epi8(0x0F))
#define U4HI(w) _mm512_and_si512(_mm512_srli_epi16((w), 4), _mm512_set1_epi8(0x0F))
#define DOT8(acc, w, a) _mm512_dpbusd_epi32((acc), (w), (a))
#include "blockmm_body.inc"
}  // namespace llmrun_kernels::avx512
