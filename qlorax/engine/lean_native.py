"""Native kernels for the lean patches' elementwise work (``lean``): RMSNorm, the gated MLP's silu(gate) * up, RoPE.

Once the int8 matmuls run on AMX tiles, a training step spends most of its time outside the matmuls: at batch 4 on
the TinyLlama-1.1B shape, RMSNorm's forward and backward and the gated MLP's elementwise work took about 0.8 s of a
4.5 s step, each op one more pass over a [tokens, width] tensor in fp32 and back (casts, products, reductions,
and with ``quant.int8_saved_mlp=int8`` the int8 codec's own passes). Here each is one pass per row, on torch's
OpenMP threads (built by ``quant.native``, bf16 activations and AVX-512 with BF16 only; elsewhere the torch
ops run):

- RMSNorm forward: the row's scale (``rstd``) still comes from torch's own reduction, so the result stays
  bit-identical to transformers'; normalizing, rounding and the weight's product are one pass.
- RMSNorm backward: input gradient and (when wanted) the weight's, per-thread partial sums added in a fixed
  order, so a step's result does not depend on thread timing (resume stays bitwise).
- gated MLP forward: ``silu(gate) * up`` from torch's ``silu(gate)`` (again bit-identical), and with int8 kept,
  both rows quantized (the codec's rounding: nearest even, max |row| -> 127) in the same pass.
- gated MLP backward: both gradients from ``grad`` and the kept gate and up (bf16 or int8 rows), silu recomputed
  with a vectorized exp (relative error ~1e-7; the backward is not required to be bit-identical).
- rotary position embedding of q and k, forward and backward: one pass each where transformers' ``rotate_half``
  makes five (two products, a negation, a concatenation, a sum; and autograd's slices and sums in backward), every
  product and sum rounded as torch's bf16 ops round them, so both directions are bit-identical to theirs.
"""
from __future__ import annotations

import functools
import logging

from qlorax.engine.quant.native import pointer

log = logging.getLogger("qlorax")

INCLUDES = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>
"""
SOURCE = r"""
#ifdef __cplusplus
extern "C" {
#endif

static inline __m512 round_bf16(__m512 v) { return bf16_to_ps(to_bf16(v)); }

/* 16 values of a kept gate or up row at column k: bf16 (scale NULL), or int8 times the row's scale, rounded to bf16
   as the torch codec's dequantize_rows returns them. */
static inline __m512 load_kept(const void* base, const float* scale, int64_t r, int64_t K, int64_t k) {
    if (!scale) return load_bf16((const uint16_t*)base + r * K + k);
    const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)((const int8_t*)base + r * K + k))));
    return round_bf16(_mm512_mul_ps(q, _mm512_set1_ps(scale[r])));
}

static inline __m512 sigmoid_ps(__m512 g) {
    const __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(one, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

/* Rows [lo, hi) of M rows for thread t of n: a fixed split (partial sums then add up the same way every time). */
static inline void share(int64_t M, int t, int n, int64_t* lo, int64_t* hi) { *lo = M * t / n; *hi = M * (t + 1) / n; }

/* RMSNorm forward after the row scale: y = bf16(w * bf16(x * rstd[row])), bf16 x, y [M, H], w [H]. */
void qlorax_rmsnorm_apply(const uint16_t* x, const float* rstd, const uint16_t* w, uint16_t* y, int64_t M, int64_t H) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < M; ++r) {
        const __m512 s = _mm512_set1_ps(rstd[r]);
        for (int64_t k = 0; k < H; k += 16) {
            const __m512 xhat = round_bf16(_mm512_mul_ps(load_bf16(x + r * H + k), s));
            store_bf16(y + r * H + k, _mm512_mul_ps(load_bf16(w + k), xhat));
        }
    }
}

/* RMSNorm backward: dx = rstd (g - xhat mean(g xhat)), g = grad w, xhat = x rstd (dx NULL: not wanted);
   dw = sum over rows of grad bf16(xhat) (dw NULL: not wanted), per-thread partials added in thread order.
   Returns 1 when the partials could not be allocated. */
int qlorax_rmsnorm_backward(const uint16_t* grad, const uint16_t* x, const float* rstd, const uint16_t* w,
                            uint16_t* dx, float* dw, int64_t M, int64_t H) {
    const int threads = omp_get_max_threads();
    float* partial = dw ? (float*)calloc((size_t)threads * H, sizeof(float)) : NULL;
    if (dw && !partial) return 1;
    int used = 1;
    #pragma omp parallel
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        int64_t lo, hi;
        share(M, t, n, &lo, &hi);
        if (t == 0) used = n;
        float* mine = partial ? partial + (int64_t)t * H : NULL;
        for (int64_t r = lo; r < hi; ++r) {
            const __m512 s = _mm512_set1_ps(rstd[r]);
            const uint16_t* gr = grad + r * H;
            const uint16_t* xr = x + r * H;
            if (dx) {
                __m512 dot = _mm512_setzero_ps();
                for (int64_t k = 0; k < H; k += 16)
                    dot = _mm512_fmadd_ps(_mm512_mul_ps(load_bf16(gr + k), load_bf16(w + k)),
                                          _mm512_mul_ps(load_bf16(xr + k), s), dot);
                const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(dot) / (float)H);
                for (int64_t k = 0; k < H; k += 16) {
                    const __m512 g = _mm512_mul_ps(load_bf16(gr + k), load_bf16(w + k));
                    const __m512 xhat = _mm512_mul_ps(load_bf16(xr + k), s);
                    store_bf16(dx + r * H + k, _mm512_mul_ps(s, _mm512_fnmadd_ps(xhat, mean, g)));
                }
            }
            if (mine)
                for (int64_t k = 0; k < H; k += 16) {
                    const __m512 xhat = round_bf16(_mm512_mul_ps(load_bf16(xr + k), s));
                    _mm512_storeu_ps(mine + k, _mm512_fmadd_ps(load_bf16(gr + k), xhat, _mm512_loadu_ps(mine + k)));
                }
        }
    }
    if (dw) {
        for (int64_t k = 0; k < H; ++k) dw[k] = 0.0f;
        for (int t = 0; t < used; ++t)
            for (int64_t k = 0; k < H; ++k) dw[k] += partial[(int64_t)t * H + k];
        free(partial);
    }
    return 0;
}

/* Per-row int8 of v (16 values per step, amax known): round(v * 127 / amax) to nearest even, saturated. */
static inline void store_q(int8_t* q, __m512 v, __m512 mul) {
    _mm_storeu_si128((__m128i*)q, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v, mul))));
}

/* Gated MLP forward: hidden = bf16(silu_gate * up) (silu_gate: torch's silu(gate), so hidden is bit-identical to
   transformers'), and where gate_q is given, gate and up as int8 rows with fp32 scales (max |row| / 127), the
   int8 codec's quantize_rows. All bf16 [M, K] but q [M, K] and scales [M]. */
void qlorax_silu_mul_forward(const uint16_t* silu_gate, const uint16_t* gate, const uint16_t* up, uint16_t* hidden,
                             int8_t* gate_q, float* gate_scale, int8_t* up_q, float* up_scale, int64_t M, int64_t K) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < M; ++r) {
        const int64_t o = r * K;
        if (gate_q) {
            __m512 ga = _mm512_setzero_ps(), ua = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k += 16) {
                ga = _mm512_max_ps(ga, _mm512_abs_ps(load_bf16(gate + o + k)));
                ua = _mm512_max_ps(ua, _mm512_abs_ps(load_bf16(up + o + k)));
            }
            float gm = _mm512_reduce_max_ps(ga), um = _mm512_reduce_max_ps(ua);
            gm = gm < 1e-12f ? 1e-12f : gm;
            um = um < 1e-12f ? 1e-12f : um;
            gate_scale[r] = gm / 127.0f;
            up_scale[r] = um / 127.0f;
            const __m512 gmul = _mm512_set1_ps(127.0f / gm), umul = _mm512_set1_ps(127.0f / um);
            for (int64_t k = 0; k < K; k += 16) {
                const __m512 u = load_bf16(up + o + k);
                store_q(gate_q + o + k, load_bf16(gate + o + k), gmul);
                store_q(up_q + o + k, u, umul);
                store_bf16(hidden + o + k, _mm512_mul_ps(load_bf16(silu_gate + o + k), u));
            }
        } else {
            for (int64_t k = 0; k < K; k += 16)
                store_bf16(hidden + o + k, _mm512_mul_ps(load_bf16(silu_gate + o + k), load_bf16(up + o + k)));
        }
    }
}

/* Gated MLP backward from the kept gate and up (bf16, or int8 rows with scales; see load_kept):
   d_up = grad silu(gate), d_gate = grad up sig(gate) (1 + gate (1 - sig(gate))); either may be NULL. */
void qlorax_silu_mul_backward(const uint16_t* grad, const void* gate, const float* gate_scale, const void* up,
                              const float* up_scale, uint16_t* d_gate, uint16_t* d_up, int64_t M, int64_t K) {
    const __m512 one = _mm512_set1_ps(1.0f);
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < M; ++r)
        for (int64_t k = 0; k < K; k += 16) {
            const __m512 g = load_kept(gate, gate_scale, r, K, k), u = load_kept(up, up_scale, r, K, k);
            const __m512 dy = load_bf16(grad + r * K + k), sig = sigmoid_ps(g);
            if (d_up) store_bf16(d_up + r * K + k, _mm512_mul_ps(dy, _mm512_mul_ps(g, sig)));
            if (d_gate) {
                const __m512 dsilu = _mm512_mul_ps(sig, _mm512_fmadd_ps(g, _mm512_sub_ps(one, sig), one));
                store_bf16(d_gate + r * K + k, _mm512_mul_ps(_mm512_mul_ps(dy, u), dsilu));
            }
        }
}

/* hidden = bf16(bf16(silu(gate)) * up) again, from the kept gate and up: the input down_proj's adapter kept. */
void qlorax_silu_mul_recompute(const void* gate, const float* gate_scale, const void* up, const float* up_scale,
                               uint16_t* hidden, int64_t M, int64_t K) {
    #pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < M; ++r)
        for (int64_t k = 0; k < K; k += 16) {
            const __m512 g = load_kept(gate, gate_scale, r, K, k);
            const __m512 silu = round_bf16(_mm512_mul_ps(g, sigmoid_ps(g)));
            store_bf16(hidden + r * K + k, _mm512_mul_ps(silu, load_kept(up, up_scale, r, K, k)));
        }
}
/* LoRA dropout without a mask (``dropout.hashed_dropout``): out[i] = bf16(t[i] * scale) where
   hash32((i + seed) mod 2^32) >= threshold, else 0; t and out bf16 [n], i the flat index. */
void qlorax_hashed_dropout(const uint16_t* t, uint16_t* out, int64_t n, int64_t seed, int64_t threshold, float scale) {
    const __m512 s = _mm512_set1_ps(scale);
    const int above = threshold > 0xFFFFFFFFLL;   /* nothing is kept */
    const __m512i thr = _mm512_set1_epi32((int32_t)(uint32_t)(above ? 0 : threshold));
    #pragma omp parallel for schedule(static) if (n >= (1 << 16))
    for (int64_t b = 0; b < n / 16; ++b) {
        const int64_t i = b * 16;
        const __mmask16 keep = above ? 0 : dropout_keep16(i, seed, thr);
        store_bf16(out + i, _mm512_maskz_mul_ps(keep, load_bf16(t + i), s));
    }
    for (int64_t i = n / 16 * 16; i < n; ++i) {   /* the tail, one at a time */
        uint32_t x = (uint32_t)((uint64_t)i + (uint64_t)seed);
        x ^= x >> 16; x *= 0x45D9F3Bu; x ^= x >> 16; x *= 0x45D9F3Bu; x ^= x >> 16;
        out[i] = float_to_bf16((!above && x >= (uint32_t)threshold) ? bf16_to_float(t[i]) * scale : 0.0f);
    }
}
/* Rotary position embedding (transformers' apply_rotary_pos_emb, rotate_half) on x [B, H, L, D] bf16, read and
   written through strides (the last dimension contiguous), with cos and sin [B, L, D] (strides; 0 broadcasts),
   halves 1 and 2 of D, every product and sum rounded to bf16 as torch's bf16 ops round them:
   forward   out1 = x1 c1 + (-x2) s1,   out2 = x2 c2 + x1 s2       (bit-identical to transformers')
   backward  out1 = g1 c1 + g2 s2,      out2 = g2 c2 + (-(g1 s1))  (autograd's input gradient of the same ops) */
void qlorax_rotary(const uint16_t* x, const uint16_t* cos, const uint16_t* sin, uint16_t* out, const int64_t* dims,
                   const int64_t* strides, int backward) {
    const int64_t B = dims[0], H = dims[1], L = dims[2], D = dims[3], half = D / 2;
    const int64_t* xs = strides;   /* x's b, h, l strides; then out's; then cos's and sin's b, l */
    const int64_t* os = strides + 3;
    const int64_t* cs = strides + 6;
    const int64_t* ss = strides + 8;
    const __m512 minus = _mm512_set1_ps(-1.0f);
    #pragma omp parallel for collapse(3) schedule(static)
    for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h)
            for (int64_t l = 0; l < L; ++l) {
                const uint16_t* xr = x + b * xs[0] + h * xs[1] + l * xs[2];
                const uint16_t* cr = cos + b * cs[0] + l * cs[1];
                const uint16_t* sr = sin + b * ss[0] + l * ss[1];
                uint16_t* o = out + b * os[0] + h * os[1] + l * os[2];
                for (int64_t d = 0; d < half; d += 16) {
                    const __m512 x1 = load_bf16(xr + d), x2 = load_bf16(xr + half + d);
                    const __m512 c1 = load_bf16(cr + d), c2 = load_bf16(cr + half + d);
                    const __m512 s1 = load_bf16(sr + d), s2 = load_bf16(sr + half + d);
                    __m512 o1, o2;
                    if (!backward) {
                        o1 = _mm512_add_ps(round_bf16(_mm512_mul_ps(x1, c1)),
                                           round_bf16(_mm512_mul_ps(_mm512_mul_ps(x2, minus), s1)));
                        o2 = _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, c2)), round_bf16(_mm512_mul_ps(x1, s2)));
                    } else {
                        o1 = _mm512_add_ps(round_bf16(_mm512_mul_ps(x1, c1)), round_bf16(_mm512_mul_ps(x2, s2)));
                        o2 = _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, c2)),
                                           _mm512_mul_ps(round_bf16(_mm512_mul_ps(x1, s1)), minus));
                    }
                    store_bf16(o + d, o1);
                    store_bf16(o + half + d, o2);
                }
            }
}
#ifdef __cplusplus
}
#endif
"""
REQUIRED_FLAGS = {"avx512f", "avx512bw", "avx512_bf16"}


@functools.cache
def library():
    """The kernels (a ctypes library), or None where the CPU lacks AVX-512 BF16 or they do not build."""
    import ctypes

    from qlorax.engine.quant import native

    lib = native.load_extension((INCLUDES, SOURCE), "qlorax_lean", REQUIRED_FLAGS,
                                "lean native kernels unavailable; RMSNorm and the gated MLP run as torch ops")
    if lib is None:
        return None
    address, size = ctypes.c_void_p, ctypes.c_int64
    for name, pointers, result in (("qlorax_rmsnorm_apply", 4, None), ("qlorax_rmsnorm_backward", 6, ctypes.c_int),
                                   ("qlorax_silu_mul_forward", 8, None), ("qlorax_silu_mul_backward", 7, None),
                                   ("qlorax_silu_mul_recompute", 5, None)):
        function = getattr(lib, name)
        function.argtypes = [address] * pointers + [size, size]
        function.restype = result
    lib.qlorax_hashed_dropout.argtypes = [address, address, size, size, size, ctypes.c_float]
    lib.qlorax_hashed_dropout.restype = None
    lib.qlorax_rotary.argtypes = [address] * 6 + [ctypes.c_int]
    lib.qlorax_rotary.restype = None
    return lib


def usable(*tensors) -> bool:
    """The kernels can take these tensors: bf16, last dimension a multiple of 16, and the library built."""
    import torch

    return (all(t.dtype == torch.bfloat16 and t.shape[-1] % 16 == 0 for t in tensors)
            and library() is not None)



def _rows(t):
    return t.contiguous().reshape(-1, t.shape[-1])


def rmsnorm_apply(x, rstd, weight):
    """``weight * (x.float() * rstd).to(bf16)`` in one pass (x bf16 [..., H], rstd fp32 [..., 1], weight bf16 [H])."""
    import torch

    rows = _rows(x)
    y = torch.empty_like(rows)
    library().qlorax_rmsnorm_apply(*map(pointer, (rows, rstd.contiguous(), weight.contiguous(), y)), *rows.shape)
    return y.reshape(x.shape)


def rmsnorm_backward(grad, x, rstd, weight, want_dx: bool, want_dw: bool):
    """(dx bf16 or None, dw fp32 [H] or None) of ``rmsnorm_apply`` for ``grad``."""
    import torch

    rows, grad_rows = _rows(x), _rows(grad)
    dx = torch.empty_like(rows) if want_dx else None
    dw = torch.empty(rows.shape[1], dtype=torch.float32) if want_dw else None
    tensors = (grad_rows, rows, rstd.contiguous(), weight.contiguous(), dx, dw)
    if library().qlorax_rmsnorm_backward(*map(pointer, tensors), *rows.shape):
        raise MemoryError("RMSNorm backward: no memory for the weight gradient's partial sums")
    return (dx.reshape(x.shape) if want_dx else None), dw


def silu_mul_forward(silu_gate, gate, up, keep_int8: bool):
    """(hidden = silu_gate * up, kept): kept is (gate, up) as int8 rows with their scales ((q [M, K], scale [M, 1])
    each, ``int8.quantize_rows``'s form) when ``keep_int8``, else None."""
    import torch

    shape = gate.shape
    s, g, u = _rows(silu_gate), _rows(gate), _rows(up)
    hidden = torch.empty_like(g)
    kept = None
    if keep_int8:
        kept = tuple((torch.empty(g.shape, dtype=torch.int8), torch.empty(g.shape[0], 1, dtype=torch.float32))
                     for _ in range(2))
        (gq, gs), (uq, us) = kept
    else:
        gq = gs = uq = us = None
    library().qlorax_silu_mul_forward(*map(pointer, (s, g, u, hidden, gq, gs, uq, us)), *g.shape)
    return hidden.reshape(shape), kept


def _kept(gate, up):
    """A kept (gate, up) as the kernels read it: bf16 tensors (as [M, K] rows), or (int8 rows, scales) pairs."""
    if isinstance(gate, tuple):
        return gate, up
    return _rows(gate), _rows(up)


def _kept_pointers(gate, up):
    """Pointers for ``_kept``'s result: (gate, its scales or NULL, up, its scales or NULL)."""
    if isinstance(gate, tuple):
        return pointer(gate[0]), pointer(gate[1]), pointer(up[0]), pointer(up[1])
    return pointer(gate), pointer(None), pointer(up), pointer(None)


def silu_mul_backward(grad, gate, up, want_gate: bool, want_up: bool):
    """(d_gate, d_up) of silu(gate) * up for ``grad`` [M, K] bf16; gate and up as ``_kept_pointers`` takes them."""
    import torch

    grad, (gate, up) = _rows(grad), _kept(gate, up)
    d_gate = torch.empty_like(grad) if want_gate else None
    d_up = torch.empty_like(grad) if want_up else None
    library().qlorax_silu_mul_backward(pointer(grad), *_kept_pointers(gate, up), pointer(d_gate), pointer(d_up),
                                       *grad.shape)
    return d_gate, d_up


def silu_mul_recompute(gate, up, rows: int, width: int):
    """bf16 silu(gate) * up [rows, width] from the kept gate and up (as ``_kept_pointers`` takes them)."""
    import torch

    gate, up = _kept(gate, up)
    hidden = torch.empty(rows, width, dtype=torch.bfloat16)
    library().qlorax_silu_mul_recompute(*_kept_pointers(gate, up), pointer(hidden), rows, width)
    return hidden


def hashed_dropout(t, seed, threshold: int, scale: float):
    """``dropout.hashed_dropout`` of bf16 ``t`` in one pass (``seed``: an int64 tensor or int)."""
    import torch

    flat = t.contiguous()
    out = torch.empty_like(flat)
    library().qlorax_hashed_dropout(pointer(flat), pointer(out), flat.numel(), int(seed), int(threshold), float(scale))
    return out.view(t.shape)


def rotary_usable(x, cos, sin) -> bool:
    """``rotary`` can take x [B, H, L, D] with cos and sin [B or 1, L, D]: bf16, D a multiple of 32, the last
    dimensions contiguous."""
    import torch

    return (x.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape and cos.shape[0] in (1, x.shape[0])
            and tuple(cos.shape[1:]) == (x.shape[2], x.shape[3]) and x.shape[3] % 32 == 0
            and all(t.dtype == torch.bfloat16 and t.stride(-1) == 1 for t in (x, cos, sin))
            and library() is not None)


def rotary(x, cos, sin, backward: bool):
    """transformers' ``apply_rotary_pos_emb`` for one of q and k (``backward``: its input gradient for a gradient
    ``x``), bf16 and bit-identical; the result has x's strides."""
    import torch

    out = torch.empty_like(x)
    shape = (x.shape[0], x.shape[2], x.shape[3])
    cos, sin = cos.expand(shape), sin.expand(shape)
    dims = torch.tensor(x.shape, dtype=torch.int64)
    strides = torch.tensor([*x.stride()[:3], *out.stride()[:3], *cos.stride()[:2], *sin.stride()[:2]],
                           dtype=torch.int64)
    library().qlorax_rotary(*map(pointer, (x, cos, sin, out, dims, strides)), int(backward))
    return out
