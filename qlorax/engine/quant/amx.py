"""int8 matmuls of ``quant.compute=int8`` on AMX (Sapphire Rapids and later Xeons): a native tile kernel.

On a Xeon with AMX, ``torch._int_mm`` runs only 1.1-1.3x the bf16 matmul (2 cores of this project's AMX machine,
256 x 2048 -> 5632: 2.5 against 3.1 ms), far from AMX-INT8's 2x: oneDNN reorders the int8 weight into its tile
layout on every call (a prepacked weight runs the same product in 1.3 ms, but that layout is opaque, and
``qlinear_prepack`` takes 22 ms, so no per-use weight such as the int4-stored one can get there). The kernel here
takes the weight as it lies:

- forward ``y = x @ W.T``: W's rows are the tile product's A operand as stored (16 rows x 64 bytes per tile load,
  no reorder); x is quantized straight into the B operand's layout (4 consecutive columns of 16 rows per 64-byte
  row); the product is y's transpose, turned back in registers in the epilogue, which applies both scales and
  writes bf16.
- input gradient ``dx = dy @ W``: dy is quantized as plain rows (the A operand); W's columns are turned into the B
  operand (4 rows interleaved byte by byte) one L2-sized strip of 128 or 256 columns at a time (``strip_columns``),
  and each strip serves every row block of dy. An int4-stored weight is unpacked straight into the strips.

Both split their output columns over torch's own OpenMP threads (see ``native.FLAGS``). The quantizer is
``int8.quantize_rows`` in C: the same rounding (nearest even) and the same fp32 operations, so the int8 rows
agree except where the reference's fused ops round a half differently (about 1 in 10^6 elements, by one).

Used where the CPU reports AMX-INT8, the kernels build, the activations are bf16 and both dimensions are
multiples of 64 (``usable``); elsewhere ``torch._int_mm`` runs. ``quant.int8_matmul=torch`` turns it off.
"""
from __future__ import annotations

import functools
import logging

from qlorax.engine.quant.native import pointer

log = logging.getLogger("qlorax")

INCLUDES = r"""
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stdlib.h>
#include <omp.h>
"""
# Shared by every tile kernel (this file's, ``amx_4bit``'s and ``engine.attention``'s), inside their extern "C"
# block: the tile configuration, thread buffers and shares, the B operand's dword layout, the 2 x 2 tile product
# and the epilogue's transpose.
TILES = r"""
/* Linux keeps AMX's tile data off until a process asks (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA). */
int qlorax_amx_init(void) { return (int)syscall(SYS_arch_prctl, 0x1023, 18); }

typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } tile_config;

/* 8 tiles of 16 rows x 64 bytes: C 0-3 (16 x 16 int32 or fp32), A 4-5, B 6-7. A constant: a stack copy filled just
   before ldtilecfg was found half written where the compiler inlined it (its stores dropped as dead: a fault). */
static const tile_config TILE_CONFIG __attribute__((aligned(64))) = {
    1, 0, {0}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};
static void configure(void) { _tile_loadconfig(&TILE_CONFIG); }

/* This thread's scratch buffer of at least `bytes` (a multiple of 64), kept across calls and grown as needed (*buffer
   and *capacity: the caller's static __thread pair); NULL where memory ran out. */
static int8_t* thread_buffer(int8_t** buffer, int64_t* capacity, int64_t bytes) {
    if (*capacity < bytes) {
        free(*buffer);
        *buffer = (int8_t*)aligned_alloc(64, bytes);
        *capacity = *buffer ? bytes : 0;
    }
    return *buffer;
}

/* 16 rows of K bytes (rows [16][K]) in the tile B operand's layout, out [K/4][16][4]: per 16 bytes, four 64-byte
   lines, each one 4-byte dword of all 16 rows (a dword transpose in registers; whole lines written). int8 rows give
   4 columns per dword, bf16 rows (K = 2 x columns) 2. */
static inline void vnni_block(const int8_t* rows, int64_t K, int8_t* out) {
    const __m512i quads = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    for (int64_t k = 0; k < K; k += 16) {
        __m512i t[4];
        for (int j = 0; j < 4; ++j) {   /* lane l: row 4j + l's 16 bytes; then lane g: quad g of rows 4j .. 4j + 3 */
            __m512i z = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)(rows + (4 * j) * K + k)));
            z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i*)(rows + (4 * j + 1) * K + k)), 1);
            z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i*)(rows + (4 * j + 2) * K + k)), 2);
            z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i*)(rows + (4 * j + 3) * K + k)), 3);
            t[j] = _mm512_permutexvar_epi32(quads, z);
        }
        const __m512i u0 = _mm512_shuffle_i64x2(t[0], t[1], 0x44), u1 = _mm512_shuffle_i64x2(t[2], t[3], 0x44);
        const __m512i u2 = _mm512_shuffle_i64x2(t[0], t[1], 0xEE), u3 = _mm512_shuffle_i64x2(t[2], t[3], 0xEE);
        int8_t* o = out + (k / 4) * 64;
        _mm512_storeu_si512((void*)(o + 0), _mm512_shuffle_i64x2(u0, u1, 0x88));
        _mm512_storeu_si512((void*)(o + 64), _mm512_shuffle_i64x2(u0, u1, 0xDD));
        _mm512_storeu_si512((void*)(o + 128), _mm512_shuffle_i64x2(u2, u3, 0x88));
        _mm512_storeu_si512((void*)(o + 192), _mm512_shuffle_i64x2(u2, u3, 0xDD));
    }
}

/* TILE_PRODUCT(name, type, dp): the 2 x 2 tile product every linear kernel runs (dp: _tile_dpbssd for int8,
   _tile_dpbf16ps for bf16; type: the C tiles' int32_t or float): C tiles 0-3 (A row block 0 or 1 times B column
   block 0 or 1, stored to c[2 * a + b]) summed over `steps` steps, each 64 bytes further along A's rows (16 rows lda
   bytes apart) and b_step bytes further along B (16 rows ldb bytes apart), added to c's tiles where `accumulate`.
   two_a / two_b: the second A / B block exists. hook (or NULL), called after each step as hook(hook_ctx, step,
   steps): vector work interleaved with the tile unit's. */
#define TILE_PRODUCT(name, type, dp)                                                                                  \
static inline __attribute__((always_inline)) void name(const void* a0_, const void* a1_, int64_t lda,             \
                                                       const void* b0_, const void* b1_, int64_t ldb, int64_t b_step, \
                                                       int64_t steps, int two_a, int two_b, int accumulate,           \
                                                       type c[4][256],                                                \
                                                       void (*hook)(void*, int64_t, int64_t), void* hook_ctx) {      \
    const int8_t *a0 = (const int8_t*)a0_, *a1 = (const int8_t*)a1_;                                               \
    const int8_t *b0 = (const int8_t*)b0_, *b1 = (const int8_t*)b1_;                                               \
    if (accumulate) {                                                                                              \
        _tile_loadd(0, c[0], 64); _tile_loadd(1, c[1], 64); _tile_loadd(2, c[2], 64); _tile_loadd(3, c[3], 64);    \
    } else {                                                                                                       \
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);                                                \
    }                                                                                                              \
    for (int64_t s = 0; s < steps; ++s) {                                                                          \
        _tile_loadd(4, a0 + s * 64, lda);                                                                          \
        _tile_loadd(6, b0 + s * b_step, ldb);                                                                      \
        dp(0, 4, 6);                                                                                               \
        if (two_b) { _tile_loadd(7, b1 + s * b_step, ldb); dp(1, 4, 7); }                                          \
        if (two_a) {                                                                                               \
            _tile_loadd(5, a1 + s * 64, lda);                                                                      \
            dp(2, 5, 6);                                                                                           \
            if (two_b) dp(3, 5, 7);                                                                                \
        }                                                                                                          \
        if (hook) hook(hook_ctx, s, steps);                                                                        \
    }                                                                                                              \
    _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64); _tile_stored(2, c[2], 64); _tile_stored(3, c[3], 64);    \
}

/* The 16 x 16 block c of 32-bit values (int32 or fp32; c[r * 16 + j]) transposed into registers, out[j] = column j:
   four rounds of in-register shuffles (64 of them), about half the cost of 16 gathers of a column each. */
static inline void transpose16(const int32_t* c, __m512i out[16]) {
    __m512i r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(c + 16 * i);
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
        r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 4; ++i) {
        t[i + 0] = _mm512_shuffle_i32x4(r[i + 0], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i + 0], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; ++i) {
        r[i + 0] = _mm512_shuffle_i32x4(t[i + 0], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i + 0], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
    }
    for (int i = 0; i < 16; ++i) out[i] = r[i];
}

/* The threads' share of [0, units): contiguous, as even as can be. */
static void share(int64_t units, int64_t* lo, int64_t* hi) {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    *lo = units * t / threads;
    *hi = units * (t + 1) / threads;
}
"""
SOURCE = r"""

/* Row xr [K] (bf16) times col_scale [K] as int8 with one fp32 scale (max|row| -> 127, rounded to nearest even). */
static inline void quantize_row(const uint16_t* xr, const float* col_scale, int64_t K, int8_t* out, float* scale) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16)
        amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_mul_ps(load_bf16(xr + k), _mm512_loadu_ps(col_scale + k))));
    float m = _mm512_reduce_max_ps(amax);
    if (m < 1e-12f) m = 1e-12f;
    *scale = m / 127.0f;
    const __m512 mul = _mm512_set1_ps(127.0f / m);
    for (int64_t k = 0; k < K; k += 16) {
        const __m512 v = _mm512_mul_ps(_mm512_mul_ps(load_bf16(xr + k), _mm512_loadu_ps(col_scale + k)), mul);
        /* rounded to nearest even, saturated */
        _mm_storeu_si128((__m128i*)(out + k), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
    }
}

/* The rows of x [M, K] (bf16, split over the threads) times col_scale [K] as int8 rows (``quantize_row``), written
   "vnni" (rows in blocks of 16: [M/16][K/4][16][4], the B operand of a tile product; each block quantized into a
   thread buffer first, then turned, its padding rows zero) or "plain" ([M, K], the A operand). Returns 1 where a
   thread buffer could not be allocated. */
int qlorax_quantize_rows(const uint16_t* x, const float* col_scale, int8_t* out, float* row_scale, int64_t M,
                         int64_t K, int vnni) {
    if (!vnni) {
        #pragma omp parallel for schedule(static) if (M >= 64)
        for (int64_t r = 0; r < M; ++r) quantize_row(x + r * K, col_scale, K, out + r * K, row_scale + r);
        return 0;
    }
    int failed = 0;
    #pragma omp parallel for schedule(static) reduction(|: failed) if (M >= 64)
    for (int64_t b = 0; b < (M + 15) / 16; ++b) {
        static __thread int8_t* buffer = NULL;
        static __thread int64_t capacity = 0;
        int8_t* rows = thread_buffer(&buffer, &capacity, 16 * K);
        if (!rows) { failed = 1; continue; }
        for (int64_t i = 0; i < 16; ++i) {
            if (16 * b + i < M) quantize_row(x + (16 * b + i) * K, col_scale, K, rows + i * K, row_scale + 16 * b + i);
            else memset(rows + i * K, 0, K);
        }
        vnni_block(rows, K, out + b * 16 * K);
    }
    return failed;
}

/* The weight as the kernels read it: int8 [N, K] as stored, or int4-stored (packed [N, K/2] two per byte, low nibble
   first, offset 8; times a multiplier per 64: mult [N, K/64]), never as a whole int8 weight in memory: unpacked 64
   values at a time (16 at a strip's unaligned edge) into the input gradient's strips, and 32 rows at a time into the
   forward's panels where x fits one L2-sized chunk (``unpacks_inside``: batch 1; with more chunks each panel would be
   unpacked once per chunk, and ``native``'s whole-weight unpack measured as fast or faster). */
typedef struct { const int8_t* w; const uint8_t* packed; const uint8_t* mult; int64_t K; } weight_t;

/* An int4 group's 16 possible int8 values, (nibble - 8) * multiplier, for each multiplier (int8.MULT_MAX = 18 at
   most; 31 leaves room), repeated in each 128-bit lane: the lookup table of ``load64``'s shuffle. */
static int8_t TABLES[32][64] __attribute__((aligned(64)));
__attribute__((constructor)) static void fill_tables(void) {
    for (int m = 0; m < 32; ++m)
        for (int i = 0; i < 64; ++i) {
            const int v = ((i & 15) - 8) * m;
            TABLES[m][i] = (int8_t)(v < -128 ? -128 : v > 127 ? 127 : v);
        }
}

/* Row r's 64 int8 weights at columns [k, k + 64) (k a multiple of 64: one int4 group). int4-stored: each packed byte
   widened to 16 bits, its high nibble shifted into the high byte and both masked (one ternary op), leaves the 64
   nibbles in order as bytes; one in-lane shuffle looks them up in the group's table (6 instructions per 64 weights,
   where multiplying in 16-bit lanes took 11). */
static inline __m512i load64(const weight_t* W, int64_t r, int64_t k) {
    if (!W->packed) return _mm512_loadu_si512((const void*)(W->w + r * W->K + k));
    const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(W->packed + r * (W->K / 2) + k / 2)));
    const __m512i nibbles = _mm512_ternarylogic_epi32(b, _mm512_slli_epi16(b, 4), _mm512_set1_epi16(0x0F0F), 0xA8);
    return _mm512_shuffle_epi8(_mm512_load_si512(TABLES[W->mult[r * (W->K / 64) + k / 64] & 31]), nibbles);
}

/* Row r's 16 int8 weights at columns [k, k + 16) (k a multiple of 16): the strips' unaligned edges. */
static inline __m128i load16(const weight_t* W, int64_t r, int64_t k) {
    if (!W->packed) return _mm_loadu_si128((const __m128i*)(W->w + r * W->K + k));
    int8_t group[64] __attribute__((aligned(64)));
    _mm512_store_si512((void*)group, load64(W, r, k / 64 * 64));
    return _mm_load_si128((const __m128i*)(group + k % 64));
}

/* Rows 4g .. 4g + 3 of W at columns [k, k + 16) interleaved byte by byte: 64 bytes of a strip (k a multiple of 16). */
static inline void pack16(const weight_t* W, int64_t g, int64_t k, int8_t* o) {
    const __m128i r0 = load16(W, 4 * g + 0, k), r1 = load16(W, 4 * g + 1, k);
    const __m128i r2 = load16(W, 4 * g + 2, k), r3 = load16(W, 4 * g + 3, k);
    const __m128i p01l = _mm_unpacklo_epi8(r0, r1), p01h = _mm_unpackhi_epi8(r0, r1);
    const __m128i p23l = _mm_unpacklo_epi8(r2, r3), p23h = _mm_unpackhi_epi8(r2, r3);
    _mm_storeu_si128((__m128i*)(o + 0), _mm_unpacklo_epi16(p01l, p23l));
    _mm_storeu_si128((__m128i*)(o + 16), _mm_unpackhi_epi16(p01l, p23l));
    _mm_storeu_si128((__m128i*)(o + 32), _mm_unpacklo_epi16(p01h, p23h));
    _mm_storeu_si128((__m128i*)(o + 48), _mm_unpackhi_epi16(p01h, p23h));
}

TILE_PRODUCT(tile_product, int32_t, _tile_dpbssd)

/* Forward y [M, N] (bf16) = (xq @ W.T) * row_scale[m] * col_scale[n], output columns [n0, n1) (multiples of 16).
   W [N, K] int8 row-major is the A operand as it lies; xq comes "vnni" with Mp (M rounded up to 16) rows. The
   tile product is y's transpose, turned in the epilogue (``transpose16``). xq's rows go `chunk` at a time
   (``chunk_rows``), each panel of W serving a whole chunk. K a multiple of 64. */
static void forward_columns(const weight_t* W, const int8_t* xq, const float* row_scale, const float* col_scale,
                            uint16_t* y, int8_t* panel, int64_t M, int64_t N, int64_t K, int64_t chunk, int64_t n0,
                            int64_t n1) {
    configure();
    const int64_t Mp = (M + 15) / 16 * 16;
    int32_t c[4][256] __attribute__((aligned(64)));
    for (int64_t mc = 0; mc < Mp; mc += chunk)
    for (int64_t n = n0; n < n1; n += 32) {
        const int two_n = n + 32 <= n1;
        const int8_t* a0 = W->w + n * K;
        if (W->packed) {   /* an int4-stored weight: this panel's rows unpacked (once per chunk of x) */
            for (int64_t r = 0; r < (two_n ? 32 : 16); ++r)
                for (int64_t k = 0; k < K; k += 64) _mm512_storeu_si512((void*)(panel + r * K + k), load64(W, n + r, k));
            a0 = panel;
        }
        const int8_t* a1 = a0 + 16 * K;
        const int64_t m_end = mc + chunk < Mp ? mc + chunk : Mp;
        for (int64_t m = mc; m < m_end; m += 32) {
            const int two_m = m + 32 <= m_end;
            const int8_t* b0 = xq + m * K;        /* block m/16 starts at (m/16) * 16K bytes; 64 k: 16 rows of 64 */
            tile_product(a0, a1, K, b0, b0 + 16 * K, 64, 1024, K / 64, two_n, two_m, 0, c, NULL, NULL);
            for (int t = 0; t < 4; ++t) {
                const int tn = t >> 1, tm = t & 1;
                if ((tn && !two_n) || (tm && !two_m)) continue;
                const int64_t nb = n + 16 * tn, mb = m + 16 * tm;
                const __m512 cs = _mm512_loadu_ps(col_scale + nb);
                __m512i col[16];
                transpose16(c[t], col);
                for (int j = 0; j < 16 && mb + j < M; ++j) {   /* col[j][r] = y[mb + j][nb + r] */
                    const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(col[j]),
                                                                 _mm512_set1_ps(row_scale[mb + j])), cs);
                    store_bf16(y + (mb + j) * N + nb, v);
                }
            }
        }
    }
    _tile_release();
}

/* Input gradient dx [M, K] (bf16) = (gq @ W) * row_scale[m] * col_scale[k], output columns [k0, k1) (multiples
   of 16). gq [Mp, N] int8 "plain" is the A operand; W's column strip is turned into the B operand (4 rows
   interleaved byte by byte: a 4 x 4 byte transpose of 64-column register rows) once per `kc_max` columns
   (``strip_columns``), in strip (N * kc_max bytes), and serves every row block. N a multiple of 64. */
static void backward_columns(const weight_t* W, const int8_t* gq, const float* row_scale, const float* col_scale,
                             uint16_t* dx, int8_t* strip, int64_t M, int64_t N, int64_t K, int64_t kc_max,
                             int64_t k0, int64_t k1) {
    configure();
    const int64_t Mp = (M + 15) / 16 * 16;
    int32_t c[4][256] __attribute__((aligned(64)));
    for (int64_t kc = k0; kc < k1; kc += kc_max) {
        const int64_t width = kc + kc_max <= k1 ? kc_max : k1 - kc;   /* a multiple of 16 */
        /* strip [N/4][width][4]: strip[g][j][i] = W[4g + i][kc + j] */
        for (int64_t g = 0; g < N / 4; ++g) {
            int64_t h = 0;
            for (; h < width && (kc + h) % 64; h += 16) pack16(W, g, kc + h, strip + g * width * 4 + h * 4);
            for (; h + 64 <= width; h += 64) {   /* 4 rows x 64 columns -> 256 bytes */
                const __m512i r0 = load64(W, 4 * g + 0, kc + h), r1 = load64(W, 4 * g + 1, kc + h);
                const __m512i r2 = load64(W, 4 * g + 2, kc + h), r3 = load64(W, 4 * g + 3, kc + h);
                const __m512i p01l = _mm512_unpacklo_epi8(r0, r1), p01h = _mm512_unpackhi_epi8(r0, r1);
                const __m512i p23l = _mm512_unpacklo_epi8(r2, r3), p23h = _mm512_unpackhi_epi8(r2, r3);
                /* q_t's 128-bit lane l: columns 16 l + 4 t .. + 3, each as 4 row bytes */
                const __m512i q0 = _mm512_unpacklo_epi16(p01l, p23l), q1 = _mm512_unpackhi_epi16(p01l, p23l);
                const __m512i q2 = _mm512_unpacklo_epi16(p01h, p23h), q3 = _mm512_unpackhi_epi16(p01h, p23h);
                const __m512i t0 = _mm512_shuffle_i64x2(q0, q1, 0x44), t1 = _mm512_shuffle_i64x2(q2, q3, 0x44);
                const __m512i t2 = _mm512_shuffle_i64x2(q0, q1, 0xEE), t3 = _mm512_shuffle_i64x2(q2, q3, 0xEE);
                int8_t* o = strip + g * width * 4 + h * 4;
                _mm512_storeu_si512((void*)(o + 0), _mm512_shuffle_i64x2(t0, t1, 0x88));
                _mm512_storeu_si512((void*)(o + 64), _mm512_shuffle_i64x2(t0, t1, 0xDD));
                _mm512_storeu_si512((void*)(o + 128), _mm512_shuffle_i64x2(t2, t3, 0x88));
                _mm512_storeu_si512((void*)(o + 192), _mm512_shuffle_i64x2(t2, t3, 0xDD));
            }
            for (; h < width; h += 16) pack16(W, g, kc + h, strip + g * width * 4 + h * 4);
        }
        const int64_t stride = width * 4;
        for (int64_t m = 0; m < Mp; m += 32) {
            const int two_m = m + 32 <= Mp;
            const int8_t* a0 = gq + m * N;
            const int8_t* a1 = a0 + 16 * N;
            for (int64_t k = 0; k < width; k += 32) {
                const int two_k = k + 32 <= width;
                const int8_t* b = strip + k * 4;   /* 64 n: 16 strip rows of `stride` bytes */
                tile_product(a0, a1, N, b, b + 64, stride, 16 * stride, N / 64, two_m, two_k, 0, c, NULL, NULL);
                for (int t = 0; t < 4; ++t) {
                    const int tm = t >> 1, tk = t & 1;
                    if ((tm && !two_m) || (tk && !two_k)) continue;
                    const int64_t mb = m + 16 * tm, kb = kc + k + 16 * tk;
                    const __m512 cs = _mm512_loadu_ps(col_scale + kb);
                    for (int i = 0; i < 16 && mb + i < M; ++i) {
                        __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(c[t] + i * 16));
                        v = _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(row_scale[mb + i])), cs);
                        store_bf16(dx + (mb + i) * K + kb, v);
                    }
                }
            }
        }
    }
    _tile_release();
}

/* y [M, N] = forward_columns over all of N, split in 32-column blocks over torch's OpenMP threads (the same
   runtime and threads as torch's own ops: a second pool would compete with their spinning workers). */
int qlorax_amx_forward(const int8_t* w, const uint8_t* packed, const uint8_t* mult, const int8_t* xq,
                       const float* row_scale, const float* col_scale, uint16_t* y, int64_t M, int64_t N, int64_t K,
                       int64_t chunk) {
    const weight_t W = {w, packed, mult, K};
    int failed = 0;
    #pragma omp parallel reduction(|: failed)
    {
        static __thread int8_t* buffer = NULL;   /* an int4-stored weight's 32 unpacked rows */
        static __thread int64_t capacity = 0;
        int8_t* panel = packed ? thread_buffer(&buffer, &capacity, 32 * K) : NULL;
        int64_t lo, hi;
        share((N + 31) / 32, &lo, &hi);
        if (lo < hi && packed && !panel) failed = 1;
        else if (lo < hi) forward_columns(&W, xq, row_scale, col_scale, y, panel, M, N, K, chunk, lo * 32,
                                          hi * 32 < N ? hi * 32 : N);
    }
    return failed;   /* 1: a panel buffer could not be allocated */
}

/* dx [M, K] = backward_columns over all of K, split likewise; each thread turns its strips in its own buffer. */
int qlorax_amx_backward(const int8_t* w, const uint8_t* packed, const uint8_t* mult, const int8_t* gq,
                        const float* row_scale, const float* col_scale, uint16_t* dx, int64_t M, int64_t N, int64_t K,
                        int64_t kc_max) {
    const weight_t W = {w, packed, mult, K};
    int failed = 0;
    #pragma omp parallel reduction(|: failed)
    {
        static __thread int8_t* buffer = NULL;
        static __thread int64_t capacity = 0;
        int8_t* strip = thread_buffer(&buffer, &capacity, N * kc_max);
        int64_t lo, hi;
        share((K + 31) / 32, &lo, &hi);
        if (lo < hi && !strip) failed = 1;
        else if (lo < hi) backward_columns(&W, gq, row_scale, col_scale, dx, strip, M, N, K, kc_max, lo * 32,
                                           hi * 32 < K ? hi * 32 : K);
    }
    return failed;   /* 1: a strip buffer could not be allocated */
}
#ifdef __cplusplus
}
#endif
"""


@functools.cache
def library():
    """The AMX kernels (a ctypes library), or None where the CPU has no AMX-INT8 or they do not build."""
    import ctypes

    lib = load_tile_library(SOURCE, "qlorax_amx", "amx_int8", "AMX int8 kernels unavailable; int8 matmuls run "
                            "through torch._int_mm")
    if lib is None:
        return None
    address, size = ctypes.c_void_p, ctypes.c_int64
    lib.qlorax_quantize_rows.argtypes = [address] * 4 + [size] * 2 + [ctypes.c_int]
    lib.qlorax_quantize_rows.restype = ctypes.c_int
    lib.qlorax_amx_forward.argtypes = [address] * 7 + [size] * 4
    lib.qlorax_amx_forward.restype = ctypes.c_int
    lib.qlorax_amx_backward.argtypes = [address] * 7 + [size] * 4
    lib.qlorax_amx_backward.restype = ctypes.c_int
    return lib


def load_tile_library(body: str, stem: str, flag: str, unavailable: str):
    """A tile kernel source's library (``body`` after ``TILES``, in one extern "C" block), its process granted AMX
    tile data; None, with a warning saying ``unavailable``, where the CPU lacks AMX (``flag``: amx_int8 or
    amx_bf16), it does not build, or the kernel refuses the tile data."""
    from qlorax.engine.quant import native

    source = '#ifdef __cplusplus\nextern "C" {\n#endif\n' + TILES + body
    lib = native.load_extension((INCLUDES, source), stem, {flag, "amx_tile", "avx512_bf16", "avx512bw"}, unavailable)
    if lib is not None and lib.qlorax_amx_init() != 0:
        log.warning("%s (arch_prctl refused tile data)", unavailable)
        return None
    return lib


def usable(in_features: int, out_features: int, x) -> bool:
    """The AMX kernels can run this layer's two matmuls for activations ``x``."""
    import torch

    return (x.dtype == torch.bfloat16 and in_features % 64 == 0 and out_features % 64 == 0
            and library() is not None)



def quantize_rows(x, col_scale, vnni: bool):
    """``int8.quantize_rows`` of bf16 ``x`` [M, K] in the kernels' layouts: (int8 rows padded to a multiple of 16,
    flat; fp32 scales [M, 1]). ``vnni``: the forward's B layout ([M/16][K/4][16][4]), else plain [M, K]."""
    import torch

    rows, cols = x.shape
    padded = -(-rows // 16) * 16
    out = torch.empty(padded * cols, dtype=torch.int8)
    if padded != rows and not vnni:   # padding rows are zero (the vnni kernel writes its blocks' own)
        out[rows * cols:].zero_()
    scale = torch.empty(rows, 1, dtype=torch.float32)
    x, col_scale = x.contiguous(), col_scale.contiguous()
    if library().qlorax_quantize_rows(pointer(x), pointer(col_scale), pointer(out), pointer(scale), rows, cols,
                                      int(vnni)):
        raise MemoryError(f"AMX int8 quantizer: no memory for 16 x {cols} int8 rows")
    return out, scale


def _weight(weight, group_mult):
    """(int8 weight, int4 packed, multipliers) pointers: int8 [N, K] as is, or int4-stored when ``group_mult``."""
    if group_mult is None:
        return pointer(weight), None, None
    return pointer(None), pointer(weight), pointer(group_mult)


def forward(x, weight, inv_smooth, weight_scale, group_mult=None):
    """bf16 ``(x * inv_smooth) @ (weight * weight_scale).T`` through int8 (x bf16 [M, K]). The weight is int8 [N, K],
    or with ``group_mult`` int4-stored (``int8.pack_int4``: packed [N, K/2]), unpacked inside the kernel one 32-row
    panel at a time (``unpacks_inside``)."""
    import torch

    rows, cols = x.shape
    q, row_scale = quantize_rows(x, inv_smooth, vnni=True)
    y = torch.empty(rows, weight.shape[0], dtype=torch.bfloat16)
    if library().qlorax_amx_forward(*_weight(weight, group_mult), *map(pointer, (q, row_scale, weight_scale, y)), rows,
                                    weight.shape[0], cols, chunk_rows(rows, cols)):
        raise MemoryError(f"AMX int8 forward: no memory for a 32 x {cols} panel buffer")
    return y


CHUNK_BYTES = 1536 * 1024   # the forward's rows of x per chunk: most of a 2 MiB L2, the weight panel besides
STRIP_BYTES = 768 * 1024    # the backward's strip of W columns (N x width): at most this where 128 columns fit


def _max_chunk(cols: int) -> int:
    return max(32, CHUNK_BYTES // cols // 32 * 32)


def chunk_rows(rows: int, cols: int, value_bytes: int = 1) -> int:
    """The forward's rows of x per chunk: every weight panel serves one chunk's rows, read from L2, before the kernel
    moves on to the next chunk. The chunks are at most ``CHUNK_BYTES`` of rows (int8 here; bf16, ``value_bytes=2``,
    in ``amx_4bit``) and as even as can be (multiples of 32). On 2 cores of the AMX machine (ms per 22 weights, int8,
    256 rows x 5632 -> 2048): 64 rows 43 ms, 128 38 ms, 256 36 ms; 1024 x 2048 -> 5632: 256 rows 145 ms, 512 142 ms."""
    padded = -(-rows // 16) * 16
    chunks = -(-padded // _max_chunk(cols * value_bytes))
    return -(-padded // chunks // 32) * 32


def unpacks_inside(rows: int, cols: int) -> bool:
    """An int4-stored weight's forward for ``rows`` of x unpacks its panels inside the kernel: where x fits one chunk
    (``chunk_rows``: each panel is then unpacked once; with more chunks, once per chunk, and unpacking the whole weight
    first measured as fast or faster)."""
    return -(-rows // 16) * 16 <= _max_chunk(cols)


def strip_columns(outs: int) -> int:
    """The backward's W columns per strip for a weight of ``outs`` rows: 256 where that strip fits ``STRIP_BYTES``,
    else 128 (2 cores, 22 weights, 1024 rows: 2048-row weights 170 -> 152 ms with 256; 5632-row weights 160 against
    179 ms with 128)."""
    return 256 if outs * 256 <= STRIP_BYTES else 128


def backward(grad, weight, weight_scale, inv_smooth, group_mult=None):
    """bf16 ``((grad * weight_scale) @ W) * inv_smooth`` through int8: the input gradient of ``forward``. W is
    ``weight`` (int8 [N, K]) or, with ``group_mult``, int4-stored (``int8.pack_int4``: packed [N, K/2]), unpacked
    inside the kernel."""
    import torch

    rows, outs = grad.shape
    cols = weight.shape[1] * (2 if group_mult is not None else 1)
    q, row_scale = quantize_rows(grad, weight_scale, vnni=False)
    dx = torch.empty(rows, cols, dtype=torch.bfloat16)
    width = strip_columns(outs)
    if library().qlorax_amx_backward(*_weight(weight, group_mult), *map(pointer, (q, row_scale, inv_smooth, dx)), rows,
                                     outs, cols, width):
        raise MemoryError(f"AMX int8 backward: no memory for a {outs} x {width} strip buffer")
    return dx
