"""The LoRA path (``lora_fused``) as native loops: each activation read once per direction, dropout inline.

A rank-r adapter's work is tiny next to its base layer's (r = 8 or 16 products per element), yet as torch ops it
took as long as the base's own int8 matmuls: at batch 4 on the TinyLlama-1.1B shape, 4.4 ms forward and backward
for one 2048 -> 2048 adapter against 0.33 ms to read its input once. Each skinny GEMM, each dropout (drawn, then
redrawn twice in backward) and each cast was one more pass over a [tokens, width] tensor. Here, per row:

    forward   middle = scaling * (dropout(x) @ A.T)      one pass over x (the keep bits hashed inline)
              out = base + middle @ B.T                  one pass over base
    backward  gm = scaling * (grad @ B); dB = grad.T @ middle      one pass over grad
              dA = gm.T @ dropout(x); dx = dropout'(gm @ A)         one pass over x (and dx written)

Rows go over torch's OpenMP threads in tiles of 16; dA and dB are summed per thread and the threads' sums added in
a fixed order, so a step's result does not depend on timing (resume stays bitwise). The dropout mask is the one
``dropout.drop`` draws for the same seed (the same hash of the same flat index), so the values equal the torch
path's to bf16 rounding: the middle is rounded once (not once after the product and once after the scaling), and
the adapter gradients are summed in fp32 (not rounded to bf16 first). bf16 activations, both widths multiples of
32 and r <= 64 only; elsewhere ``lora_fused`` runs its torch ops.
"""
from __future__ import annotations

import functools

from qlorax.engine.quant.native import pointer

INCLUDES = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
"""
SOURCE = r"""
#ifdef __cplusplus
extern "C" {
#endif
#define MAXR 64
#define TILE 16
#define NC 256   /* backward: grad's columns per L1-sized chunk (a multiple of 32) */

/* x [M, K] (bf16) dropped (keep bits of flat index t * K + k for seed; kept values times drop_scale, rounded to
   bf16), times A [r, K] (bf16) and scaling: middle [M, r] (bf16); out [M, N] = base + middle @ Bt (Bt [r, N] fp32
   holding B's bf16 values), rounded to bf16. K and N multiples of 32. */
void qlorax_lora_forward(const uint16_t* x, const uint16_t* base, const uint16_t* A, const float* Bt, uint16_t* middle,
                         uint16_t* out, int64_t M, int64_t K, int64_t N, int64_t r, int64_t seed, int64_t threshold,
                         float drop_scale, float scaling) {
    const __m512i thr = _mm512_set1_epi32((int32_t)(uint32_t)threshold);
    const __m512 ds = _mm512_set1_ps(threshold > 0xFFFFFFFFLL ? 0.0f : drop_scale);   /* p = 1: nothing kept */
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < M; ++t) {
        __m512 acc[MAXR];
        for (int64_t j = 0; j < r; ++j) acc[j] = _mm512_setzero_ps();
        const uint16_t* xr = x + t * K;
        for (int64_t k = 0; k < K; k += 32) {
            const __m512 x0 = _mm512_maskz_mul_ps(dropout_keep16(t * K + k, seed, thr), load_bf16(xr + k), ds);
            const __m512 x1 = _mm512_maskz_mul_ps(dropout_keep16(t * K + k + 16, seed, thr), load_bf16(xr + k + 16), ds);
            const __m512bh xb = _mm512_cvtne2ps_pbh(x1, x0);
            for (int64_t j = 0; j < r; ++j)
                acc[j] = _mm512_dpbf16_ps(acc[j], xb, (__m512bh)_mm512_loadu_si512((const void*)(A + j * K + k)));
        }
        float m[MAXR];
        for (int64_t j = 0; j < r; ++j) {
            middle[t * r + j] = float_to_bf16(_mm512_reduce_add_ps(acc[j]) * scaling);
            m[j] = bf16_to_float(middle[t * r + j]);
        }
        for (int64_t n = 0; n < N; n += 16) {
            __m512 o = load_bf16(base + t * N + n);
            for (int64_t j = 0; j < r; ++j) o = _mm512_fmadd_ps(_mm512_set1_ps(m[j]), _mm512_loadu_ps(Bt + j * N + n), o);
            store_bf16(out + t * N + n, o);
        }
    }
}

/* The backward of qlorax_lora_forward for grad [M, N] (bf16): grad_x [M, K] (bf16; NULL: not wanted), grad_a [r, K]
   and grad_bt [r, N] (fp32, the transpose of B's gradient; NULL: not wanted). Bt16 [r, N] is B transposed (bf16),
   A [r, K] bf16, middle [M, r] the forward's. Returns 1 where memory ran out. */
static inline __attribute__((always_inline)) int lora_backward(
        const uint16_t* grad, const uint16_t* x, const uint16_t* middle, const uint16_t* A, const uint16_t* Bt16,
        uint16_t* grad_x, float* grad_a, float* grad_bt, int64_t M, int64_t K, int64_t N, const int64_t r, int64_t seed,
        int64_t threshold, float drop_scale, float scaling) {
    const __m512i thr = _mm512_set1_epi32((int32_t)(uint32_t)threshold);
    const __m512 ds = _mm512_set1_ps(threshold > 0xFFFFFFFFLL ? 0.0f : drop_scale);   /* p = 1: nothing kept */
    const int threads = omp_get_max_threads();
    float* partial = (float*)calloc((size_t)threads * r * (K + N), sizeof(float));   /* per thread: dA [r, K], dBt [r, N] */
    if (!partial) return 1;
    #pragma omp parallel
    {
        float* pa = partial + (size_t)omp_get_thread_num() * r * (K + N);
        float* pb = pa + r * K;
        #pragma omp for schedule(static)
        for (int64_t t0 = 0; t0 < M; t0 += TILE) {
            const int64_t rows = M - t0 < TILE ? M - t0 : TILE;
            float gm[TILE][MAXR], mid[TILE][MAXR];
            __m512 dots[TILE][MAXR];
            for (int64_t i = 0; i < rows; ++i)
                for (int64_t j = 0; j < r; ++j) {
                    dots[i][j] = _mm512_setzero_ps();
                    mid[i][j] = bf16_to_float(middle[(t0 + i) * r + j]);
                }
            /* grad's tile, NC columns at a time (B's columns stay in L1): gm's dot products, then dB^T's sums */
            for (int64_t n0 = 0; n0 < N; n0 += NC) {
                const int64_t n1 = n0 + NC < N ? n0 + NC : N;
                for (int64_t i = 0; i < rows; ++i) {
                    __m512 dot[MAXR];
                    for (int64_t j = 0; j < r; ++j) dot[j] = dots[i][j];
                    const uint16_t* g = grad + (t0 + i) * N;
                    for (int64_t n = n0; n < n1; n += 32) {
                        const __m512bh gv = (__m512bh)_mm512_loadu_si512((const void*)(g + n));
                        for (int64_t j = 0; j < r; ++j)
                            dot[j] = _mm512_dpbf16_ps(dot[j], gv, (__m512bh)_mm512_loadu_si512((const void*)(Bt16 + j * N + n)));
                    }
                    for (int64_t j = 0; j < r; ++j) dots[i][j] = dot[j];
                }
                if (grad_bt)
                    for (int64_t n = n0; n < n1; n += 16) {
                        __m512 b[MAXR];
                        for (int64_t j = 0; j < r; ++j) b[j] = _mm512_setzero_ps();
                        for (int64_t i = 0; i < rows; ++i) {
                            const __m512 g = load_bf16(grad + (t0 + i) * N + n);
                            for (int64_t j = 0; j < r; ++j) b[j] = _mm512_fmadd_ps(g, _mm512_set1_ps(mid[i][j]), b[j]);
                        }
                        for (int64_t j = 0; j < r; ++j)
                            _mm512_storeu_ps(pb + j * N + n, _mm512_add_ps(_mm512_loadu_ps(pb + j * N + n), b[j]));
                    }
            }
            for (int64_t i = 0; i < rows; ++i)
                for (int64_t j = 0; j < r; ++j) gm[i][j] = _mm512_reduce_add_ps(dots[i][j]) * scaling;
            /* x's rows, 16 columns at a time: dA's sums over the tile, and dx */
            for (int64_t k = 0; k < K; k += 16) {
                __m512 a[MAXR], av[MAXR];
                for (int64_t j = 0; j < r; ++j) {
                    a[j] = _mm512_setzero_ps();
                    if (grad_x) av[j] = load_bf16(A + j * K + k);
                }
                for (int64_t i = 0; i < rows; ++i) {
                    const int64_t t = t0 + i;
                    const __mmask16 keep = dropout_keep16(t * K + k, seed, thr);
                    if (grad_a) {
                        const __m512 kept = bf16_to_ps(to_bf16(_mm512_maskz_mul_ps(keep, load_bf16(x + t * K + k), ds)));
                        for (int64_t j = 0; j < r; ++j) a[j] = _mm512_fmadd_ps(_mm512_set1_ps(gm[i][j]), kept, a[j]);
                    }
                    if (grad_x) {
                        __m512 dx = _mm512_setzero_ps();
                        for (int64_t j = 0; j < r; ++j) dx = _mm512_fmadd_ps(_mm512_set1_ps(gm[i][j]), av[j], dx);
                        store_bf16(grad_x + t * K + k, _mm512_maskz_mul_ps(keep, dx, ds));
                    }
                }
                if (grad_a)
                    for (int64_t j = 0; j < r; ++j)
                        _mm512_storeu_ps(pa + j * K + k, _mm512_add_ps(_mm512_loadu_ps(pa + j * K + k), a[j]));
            }
        }
    }
    /* the threads' sums, added in thread order */
    for (int64_t th = 0; th < threads; ++th) {
        const float* pa = partial + (size_t)th * r * (K + N);
        if (grad_a) for (int64_t e = 0; e < r * K; ++e) grad_a[e] = th ? grad_a[e] + pa[e] : pa[e];
        if (grad_bt) for (int64_t e = 0; e < r * N; ++e) grad_bt[e] = th ? grad_bt[e] + pa[r * K + e] : pa[r * K + e];
    }
    free(partial);
    return 0;
}
int qlorax_lora_backward(const uint16_t* grad, const uint16_t* x, const uint16_t* middle, const uint16_t* A,
                         const uint16_t* Bt16, uint16_t* grad_x, float* grad_a, float* grad_bt, int64_t M, int64_t K,
                         int64_t N, int64_t r, int64_t seed, int64_t threshold, float drop_scale, float scaling) {
    /* the common ranks compiled with r a constant: the per-rank loops unrolled, their sums kept in registers
       (r = 8 at 256 tokens: 2048 -> 2048 0.56 -> 0.33 ms, 5632 -> 2048 1.0-1.2 -> 0.63-0.92 ms) */
#define LORA_BACKWARD(rank) lora_backward(grad, x, middle, A, Bt16, grad_x, grad_a, grad_bt, M, K, N, rank, seed, \
                                          threshold, drop_scale, scaling)
    switch (r) {
        case 4: return LORA_BACKWARD(4);
        case 8: return LORA_BACKWARD(8);
        case 16: return LORA_BACKWARD(16);
        case 32: return LORA_BACKWARD(32);
        default: return LORA_BACKWARD(r);
    }
#undef LORA_BACKWARD
}
#ifdef __cplusplus
}
#endif
"""
MAX_RANK = 64


@functools.cache
def library():
    """The kernels (a ctypes library), or None where the CPU lacks AVX-512 BF16 or they do not build."""
    import ctypes

    from qlorax.engine.quant import native

    lib = native.load_extension((INCLUDES, SOURCE), "qlorax_lora", {"avx512f", "avx512bw", "avx512_bf16"},
                                "native LoRA kernels unavailable; the LoRA path runs as torch ops")
    if lib is None:
        return None
    address, size = ctypes.c_void_p, ctypes.c_int64
    lib.qlorax_lora_forward.argtypes = [address] * 6 + [size] * 6 + [ctypes.c_float] * 2
    lib.qlorax_lora_forward.restype = None
    lib.qlorax_lora_backward.argtypes = [address] * 8 + [size] * 6 + [ctypes.c_float] * 2
    lib.qlorax_lora_backward.restype = ctypes.c_int
    return lib


def usable(x, base, rank: int) -> bool:
    """The kernels can run this adapter: bf16 x [M, K] and base [M, N], K and N multiples of 32, r <= 64."""
    import torch

    return (x.dtype == torch.bfloat16 and base.dtype == torch.bfloat16 and x.shape[-1] % 32 == 0
            and base.shape[-1] % 32 == 0 and 0 < rank <= MAX_RANK and library() is not None)



def weights(a, b):
    """The adapter's A [r, K] and B [N, r] (any float dtype) as the kernels read them: (A bf16, B^T bf16 [r, N],
    B^T as fp32 holding the bf16 values). Made once per forward call and kept for its backward: three small copies
    where each direction made its own (seven per adapter and micro-batch, about 12 us each)."""
    import torch

    a16 = a.to(torch.bfloat16).contiguous()
    bt16 = torch.empty(b.shape[1], b.shape[0], dtype=torch.bfloat16).copy_(b.t())
    return a16, bt16, bt16.float()


def forward(x, base, adapter, scaling: float, seed: int, threshold: int, drop_scale: float):
    """(out, middle): ``base + (scaling * dropout(x) @ a.T) @ b.T`` in bf16 and its bf16 middle [M, r].
    x [M, K], base [M, N] bf16; ``adapter``: ``weights(a, b)``."""
    import torch

    x, base = x.contiguous(), base.contiguous()
    a16, _, bt = adapter
    rank = a16.shape[0]
    middle = torch.empty(x.shape[0], rank, dtype=torch.bfloat16)
    out = torch.empty_like(base)
    library().qlorax_lora_forward(*map(pointer, (x, base, a16, bt, middle, out)), x.shape[0], x.shape[1], base.shape[1],
                                  rank, int(seed), int(threshold), float(drop_scale), float(scaling))
    return out, middle


def backward(grad, x, middle, adapter, scaling: float, seed: int, threshold: int, drop_scale: float,
             want_x: bool, want_a: bool, want_b: bool):
    """(grad_x bf16 or None, grad_a fp32 [r, K] or None, grad_b fp32 [N, r] or None) of ``forward`` (``adapter``:
    the ``weights(a, b)`` it ran with)."""
    import torch

    grad, x = grad.contiguous(), x.contiguous()   # the kernel indexes rows as t * width
    rows, outs = grad.shape
    a16, bt16, _ = adapter
    rank, cols = a16.shape
    grad_x = torch.empty(rows, cols, dtype=torch.bfloat16) if want_x else None
    grad_a = torch.empty(rank, cols, dtype=torch.float32) if want_a else None
    grad_bt = torch.empty(rank, outs, dtype=torch.float32) if want_b else None
    if library().qlorax_lora_backward(*map(pointer, (grad, x, middle, a16, bt16, grad_x, grad_a, grad_bt)), rows, cols,
                                      outs, rank, int(seed), int(threshold), float(drop_scale), float(scaling)):
        raise MemoryError(f"native LoRA backward: no memory for the threads' {rank} x {cols + outs} sums")
    return grad_x, grad_a, None if grad_bt is None else grad_bt.t()
