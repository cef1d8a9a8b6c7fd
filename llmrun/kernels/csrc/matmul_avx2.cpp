// The AVX2 matmul bodies (vpmaddubsw + vpmaddwd: u8 x s8 pairs of |q| <= 8 never saturate):
// int4 and block matmuls, one translation unit without torch headers.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#include "blockmm.h"
#include "int4mm.h"
#include "ymm.h"

namespace llmrun_kernels::avx2 {
#define TGT __attribute__((target("avx2,fma,f16c")))
// sign-extend a nibble (0..15 as 4-bit two's complement) with a byte shuffle
#define NIBLUT _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1, \
                                0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1)
#define UNLO(w) _mm256_shuffle_epi8(NIBLUT, _mm256_and_si256((w), _mm256_set1_epi8(0x0F)))
#define UNHI(w) _mm256_shuffle_epi8(NIBLUT, _mm256_and_si256(_mm256_srli_epi16((w), 4), _mm256_set1_epi8(0x0F)))
#define DOT(acc, a, x) _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((a), (x)), _mm256_set1_epi16(1)))
#define DOT2(acc, a0, x0, a1, x1)                                                              \
  _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16((a0), (x0)), \
                                                             _mm256_maddubs_epi16((a1), (x1))), \
                                            _mm256_set1_epi16(1)))
#define WSCALE 1
#define WSHIFT 0
#include "int4mm_body.inc"
// 8-bit codes as 16 * high nibble + low nibble: a 255 x 127 pair would saturate vpmaddubsw
#define DOT8(acc, w, a)                                                                        \
  _mm256_add_epi32(_mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16(U4LO(w), (a)), \
                                                             _mm256_set1_epi16(1))),          \
                   _mm256_madd_epi16(_mm256_maddubs_epi16(U4HI(w), (a)), _mm256_set1_epi16(16)))
// Symmetric 8-bit codes as signed q = u - 128 instead: |q| x sign(a, q) pairs stay below
// vpmaddubsw's saturation (2 * 128 * 127 < 2^15) and give S - 128 A directly, in 4 ops per
// row where DOT8 takes 9
#define SIGNED8 1
#define Q8(w) _mm256_xor_si256((w), _mm256_set1_epi8((char)0x80))
#define ABS8(q) _mm256_abs_epi8(q)
#define DOT8S(acc, qabs, q, a) \
  _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((qabs), _mm256_sign_epi8((a), (q))), _mm256_set1_epi16(1)))
#define I16ACC 1
#define DOT16(acc, w, a) _mm256_add_epi16((acc), _mm256_maddubs_epi16((w), (a)))
#define WIDEN16(acc) _mm256_madd_epi16((acc), _mm256_set1_epi16(1))
#define ADD16(x, y) _mm256_add_epi16((x), (y))
#include "blockmm_body.inc"
}  // namespace llmrun_kernels::avx2
