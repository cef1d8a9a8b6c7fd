// The ymm macros int4mm_body.inc and blockmm_body.inc take, shared by the AVX-VNNI and AVX2
// bodies (matmul_avxvnni.cpp, matmul_avxvnni_evex.cpp, matmul_avx2.cpp).
#pragma once
#include <immintrin.h>

#define VPP 2
#define VI __m256i
#define VF __m256
#define LOADW(p) _mm256_loadu_si256((const __m256i*)(p))
#define SET1I(x) _mm256_set1_epi32(x)
#define SET1F(x) _mm256_set1_ps(x)
#define ZEROI() _mm256_setzero_si256()
#define ZEROF() _mm256_setzero_ps()
#define ADDI(a, b) _mm256_add_epi32((a), (b))
#define SUBI(a, b) _mm256_sub_epi32((a), (b))
#define SLLI(a, n) _mm256_slli_epi32((a), (n))
#define CVT(a) _mm256_cvtepi32_ps(a)
#define FMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define FMS(a, b, c) _mm256_fmsub_ps((a), (b), (c))
#define MUL(a, b) _mm256_mul_ps((a), (b))
#define LOADF(p) _mm256_loadu_ps(p)
#define LOADI(p) _mm256_loadu_si256((const __m256i*)(p))
#define LOADH(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p)))
#define STOREF(p, v) _mm256_storeu_ps((p), (v))
#define RMAX 3
#define CMAX 1
#define GRMAX 3
#define GCMAX 1
#define U4LO(w) _mm256_and_si256((w), _mm256_set1_epi8(0x0F))
#define U4HI(w) _mm256_and_si256(_mm256_srli_epi16((w), 4), _mm256_set1_epi8(0x0F))
