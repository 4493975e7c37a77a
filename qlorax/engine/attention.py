"""Attention's backward on AMX-BF16 tiles, for training (``train.lean_kernels``).

torch's CPU flash-attention backward is most of attention's cost in a training step (batch 4, seq 256 on the
TinyLlama-1.1B shape: about 23 ms of a layer's 27, 0.5 s a step), and it computes in fp32 with AVX-512. Here the
backward runs per (batch, query head) on AMX-BF16 tiles, with everything a head needs in L2:

    S = Q K^T, dP = dO V^T                     (tile GEMMs; blocks above the diagonal skipped)
    P = softmax(scale S) under the mask        (recomputed row by row: no saved softmax statistics)
    dS = P * (dP - rowsum(P * dP)) * scale
    dV^T = dO^T P, dQ = dS K, dK^T = Q^T dS    (tile GEMMs, P and dS as bf16)

dK and dV come out per query head in fp32 and are summed over each key/value head's group (GQA) afterwards.
Against fp64, its gradients are more accurate than torch's kernel (relative error 2.2-2.5e-3 against 3.4-5e-3).

The forward is transformers' own ``sdpa_attention_forward``, so outputs stay bit-identical. The model's attention
implementation becomes ``qlorax_sdpa`` (registered with transformers' attention and mask interfaces; the masks are
SDPA's). A call takes the tile backward only where it can: gradients wanted, bf16 q/k/v, a head size that is a
multiple of 32, no cache (as many keys as queries, 2 to ``MAX_LENGTH``), no dropout, softcap, sinks or position
bias, and a causal attention: no mask, or a boolean one inside the causal triangle (padding and packed documents;
a query row that sees nothing gets zero gradients). Anything else, and CPUs without AMX-BF16, run transformers' SDPA
unchanged. ``QLORAX_NATIVE_KERNELS=0`` turns it off.
"""
from __future__ import annotations

import functools

from qlorax.engine.quant.native import pointer

NAME = "qlorax_sdpa"
# Longer sequences run torch's kernel: S and dP of a head (4 L^2 bytes each) leave L2, and the per-head tile GEMMs
# fall to the flash kernel's speed (1 x 1024: 44.4 against 43.5 ms in the prototype; 2.4x faster at 256).
MAX_LENGTH = 512

SOURCE = r"""
/* C [M, N] (fp32, ldc) = A [M, K] (bf16 rows, lda) times B (VNNI pairs: [K/2][N][2]); M, N multiples of 16, K of 32.
   The causal triangle's zeros are skipped: CAUSAL_C, C's blocks right of the diagonal (not needed); ZERO_B_ABOVE, B is
   zero where its row < its column (P or dS as B: sum from the column's block on); ZERO_A_RIGHT, A is zero where its
   column > its row (dS as A: sum up to the row's block). Skipped products are exact zeros: the same result. */
enum { CAUSAL_C = 1, ZERO_B_ABOVE, ZERO_A_RIGHT };
static void gemm(const uint16_t* A, int64_t lda, const uint16_t* B, int64_t N, float* C, int64_t ldc, int64_t M,
                 int64_t K, int zeros) {
    for (int64_t mb = 0; mb < M / 16; ++mb)
        for (int64_t nb = 0; nb < N / 16; ++nb) {
            if (zeros == CAUSAL_C && nb > mb) continue;
            const int64_t t0 = zeros == ZERO_B_ABOVE ? nb / 2 : 0;
            const int64_t t1 = zeros == ZERO_A_RIGHT ? (mb * 16 + 15) / 32 + 1 : K / 32;
            _tile_zero(0);
            for (int64_t t = t0; t < t1; ++t) {
                _tile_loadd(4, A + mb * 16 * lda + t * 32, lda * 2);
                _tile_loadd(6, B + (t * 16 * N + nb * 16) * 2, N * 4);
                _tile_dpbf16ps(0, 4, 6);
            }
            _tile_stored(0, C + mb * 16 * ldc + nb * 16, ldc * 4);
        }
}

/* VNNI pairs [K/2][N][2] of X [K, N], X[k][n] = src[k * sk + n * sn], for k < kv and n < nv (the rest stays as it
   is: zero from calloc). */
static void pack_pairs(const uint16_t* src, int64_t sk, int64_t sn, int64_t kv, int64_t nv, uint16_t* out, int64_t N) {
    for (int64_t k = 0; k < kv; ++k)
        for (int64_t n = 0; n < nv; ++n) out[((k / 2) * N + n) * 2 + (k & 1)] = src[k * sk + n * sn];
}

/* 16 values of row i (columns j..j+15) into VNNI pairs over rows ([L/2][L][2]). */
static inline void store_pairs(uint16_t* out, int64_t L, int64_t i, int64_t j, __m512 v) {
    __m512i w = _mm512_cvtepu16_epi32(to_bf16(v));
    if (i & 1) w = _mm512_slli_epi32(w, 16);
    _mm512_mask_storeu_epi16(out + ((i / 2) * L + j) * 2, (i & 1) ? 0xAAAAAAAA : 0x55555555, w);
}

/* dst [D, Lp] = src [L, D]^T (rows ld apart), 16 columns of src at a time (16 live rows of dst: no cache set
   conflicts at power-of-two Lp). */
static void transpose(const uint16_t* src, int64_t ld, int64_t L, int64_t D, uint16_t* dst, int64_t Lp) {
    for (int64_t e0 = 0; e0 < D; e0 += 16)
        for (int64_t i = 0; i < L; ++i)
            for (int64_t e = e0; e < e0 + 16; ++e) dst[e * Lp + i] = src[i * ld + e];
}

static inline __mmask16 upto(int64_t cols, int64_t j) {
    return cols - j >= 16 ? 0xFFFF : (cols > j ? (__mmask16)((1u << (cols - j)) - 1) : 0);
}

/* Which of columns j .. j + 15 of a row a query sees: those before `cols` that its mask row allows (mrow NULL: all). */
static inline __mmask16 seen(const uint8_t* mrow, int64_t cols, int64_t j) {
    const __mmask16 m = upto(cols, j);
    return mrow && m ? m & _mm_test_epi8_mask(_mm_maskz_loadu_epi8(m, mrow + j), _mm_set1_epi8(1)) : m;
}

/* One head's softmax row i (columns <= i, those the mask allows): P and dS into Pv / dSv (pairs) and dS (rows);
   e: Lp floats of scratch. */
static void softmax_row(const float* s, const float* d, const uint8_t* mrow, int64_t i, int64_t Lp, float scale,
                        float* e, uint16_t* Pv, uint16_t* dSv, uint16_t* dS) {
    const int64_t cols = i + 1;
    const __m512 vs = _mm512_set1_ps(scale);
    __m512 mx = _mm512_set1_ps(-__builtin_inff());
    for (int64_t j = 0; j < cols; j += 16)
        mx = _mm512_mask_max_ps(mx, seen(mrow, cols, j), mx, _mm512_mul_ps(_mm512_loadu_ps(s + j), vs));
    const float row_max = _mm512_reduce_max_ps(mx);
    const __m512 vm = _mm512_set1_ps(row_max == -__builtin_inff() ? 0.0f : row_max);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < Lp; j += 16) {
        const __mmask16 m = seen(mrow, cols, j);
        const __m512 v = _mm512_maskz_mov_ps(m, exp_ps(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, s + j), vs, vm)));
        _mm512_store_ps(e + j, v);
        sum = _mm512_add_ps(sum, v);
    }
    const float total = _mm512_reduce_add_ps(sum);
    const __m512 vi = _mm512_set1_ps(total > 0 ? 1.0f / total : 0.0f);   /* a row that sees nothing: P = 0 */
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < cols; j += 16)
        acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_load_ps(e + j), vi), _mm512_maskz_loadu_ps(upto(cols, j), d + j), acc);
    const __m512 delta = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
    for (int64_t j = 0; j < Lp; j += 16) {
        const __m512 p = _mm512_mul_ps(_mm512_load_ps(e + j), vi);
        const __m512 ds = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(_mm512_maskz_loadu_ps(upto(cols, j), d + j), delta)), vs);
        store_pairs(Pv, Lp, i, j, p);
        store_pairs(dSv, Lp, i, j, ds);
        store_bf16(dS + i * Lp + j, ds);
    }
}

/* Attention's input gradients for q [B, H, L, D], k and v [B, Hk, L, D] (bf16, any strides with D contiguous:
   strides[0..11] = batch, head and row strides of q, k, v and dout, in elements) and dout (the output's gradient,
   same layout as q). mask: NULL (causal) or bool [B or 1, L, L] (mask_batch: its batch stride, 0 to broadcast),
   inside the causal triangle. Writes dq [B, H, L, D] bf16 and dk, dv transposed, per query head: [B, H, D, L] fp32.
   L any length (padded to a multiple of 32 inside), D a multiple of 32. Returns 1 where memory ran out. */
int qlorax_attention_backward(const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* dout,
                              const uint8_t* mask, int64_t mask_batch, const int64_t* strides, uint16_t* dq, float* dkt,
                              float* dvt, int64_t B, int64_t H, int64_t Hk, int64_t L, int64_t D, float scale) {
    const int64_t Lp = (L + 31) / 32 * 32, rep = H / Hk;
    int failed = 0;
    #pragma omp parallel reduction(|: failed)
    {
        configure();
        float* S = (float*)aligned_alloc(64, Lp * Lp * 4);
        float* dP = (float*)aligned_alloc(64, Lp * Lp * 4);
        float* C = (float*)aligned_alloc(64, Lp * D * 4);
        float* E = (float*)aligned_alloc(64, Lp * 4);
        /* zeroed once: the padding rows and columns (>= L) are never written */
        uint16_t* Pv = (uint16_t*)calloc(Lp * Lp, 2);
        uint16_t* dSv = (uint16_t*)calloc(Lp * Lp, 2);
        uint16_t* dS = (uint16_t*)calloc(Lp * Lp, 2);
        uint16_t* Qr = (uint16_t*)calloc(Lp * D, 2);    /* Q rows */
        uint16_t* Or = (uint16_t*)calloc(Lp * D, 2);    /* dO rows */
        uint16_t* Qt = (uint16_t*)calloc(Lp * D, 2);    /* Q^T [D, Lp] */
        uint16_t* Ot = (uint16_t*)calloc(Lp * D, 2);    /* dO^T [D, Lp] */
        uint16_t* Kt = (uint16_t*)calloc(Lp * D, 2);    /* K^T as pairs [D/2][Lp][2] */
        uint16_t* Vt = (uint16_t*)calloc(Lp * D, 2);    /* V^T as pairs */
        uint16_t* Kp = (uint16_t*)calloc(Lp * D, 2);    /* K as pairs [Lp/2][D][2] */
        const int ok = S && dP && C && E && Pv && dSv && dS && Qr && Or && Qt && Ot && Kt && Vt && Kp;
        if (!ok) failed = 1;
        {
            int64_t packed = -1;   /* the (batch, kv head) whose K and V are packed */
            #pragma omp for schedule(static)   /* every thread meets it, buffers or not (its barrier) */
            for (int64_t u = 0; u < B * H; ++u) {
                if (!ok) continue;
                const int64_t b = u / H, h = u % H, g = b * Hk + h / rep;
                const uint16_t* qh = q + b * strides[0] + h * strides[1];
                const uint16_t* oh = dout + b * strides[9] + h * strides[10];
                if (g != packed) {
                    const uint16_t* kh = k + b * strides[3] + (h / rep) * strides[4];
                    const uint16_t* vh = v + b * strides[6] + (h / rep) * strides[7];
                    pack_pairs(kh, 1, strides[5], D, L, Kt, Lp);
                    pack_pairs(vh, 1, strides[8], D, L, Vt, Lp);
                    pack_pairs(kh, strides[5], 1, L, D, Kp, D);
                    packed = g;
                }
                /* Q and dO as rows (their own rows where no padding is needed) and transposed */
                const uint16_t* Qa = qh; const uint16_t* Oa = oh;
                int64_t lq = strides[2], lo = strides[11];
                if (Lp != L) {
                    for (int64_t i = 0; i < L; ++i) {
                        memcpy(Qr + i * D, qh + i * strides[2], D * 2);
                        memcpy(Or + i * D, oh + i * strides[11], D * 2);
                    }
                    Qa = Qr; Oa = Or; lq = lo = D;
                }
                transpose(qh, strides[2], L, D, Qt, Lp);
                transpose(oh, strides[11], L, D, Ot, Lp);
                gemm(Qa, lq, Kt, Lp, S, Lp, Lp, D, CAUSAL_C);     /* S = Q K^T */
                gemm(Oa, lo, Vt, Lp, dP, Lp, Lp, D, CAUSAL_C);    /* dP = dO V^T */
                const uint8_t* mb = mask ? mask + b * mask_batch : NULL;
                for (int64_t i = 0; i < L; ++i)
                    softmax_row(S + i * Lp, dP + i * Lp, mb ? mb + i * L : NULL, i, Lp, scale, E, Pv, dSv, dS);
                gemm(Ot, Lp, Pv, Lp, C, Lp, D, Lp, ZERO_B_ABOVE);    /* dV^T = dO^T P */
                for (int64_t e = 0; e < D; ++e) memcpy(dvt + (u * D + e) * L, C + e * Lp, L * 4);
                gemm(Qt, Lp, dSv, Lp, C, Lp, D, Lp, ZERO_B_ABOVE);    /* dK^T = Q^T dS */
                for (int64_t e = 0; e < D; ++e) memcpy(dkt + (u * D + e) * L, C + e * Lp, L * 4);
                gemm(dS, Lp, Kp, D, C, D, Lp, Lp, ZERO_A_RIGHT);     /* dQ = dS K */
                for (int64_t i = 0; i < L; ++i)
                    for (int64_t e = 0; e < D; e += 16) store_bf16(dq + (u * L + i) * D + e, _mm512_loadu_ps(C + i * D + e));
            }
        }
        free(S); free(dP); free(C); free(E); free(Pv); free(dSv); free(dS); free(Qr); free(Or); free(Qt); free(Ot);
        free(Kt); free(Vt); free(Kp);
        _tile_release();
    }
    return failed;
}
#ifdef __cplusplus
}
#endif
"""


@functools.cache
def library():
    """The tile kernel (a ctypes library), or None where the CPU has no AMX-BF16 or it does not build."""
    import ctypes

    from qlorax.engine.quant import amx

    lib = amx.load_tile_library(SOURCE, "qlorax_attention", "amx_bf16", "AMX attention backward unavailable; "
                                "attention's backward runs torch's kernel")
    if lib is None:
        return None
    address, size = ctypes.c_void_p, ctypes.c_int64
    lib.qlorax_attention_backward.argtypes = ([address] * 5 + [size, address] + [address] * 3 + [size] * 5
                                              + [ctypes.c_float])
    lib.qlorax_attention_backward.restype = ctypes.c_int
    return lib


# ------------------------------------------------------------------ the kernel from torch
def backward(query, key, value, grad_out, mask, scale: float):
    """(dq, dk, dv) of causal attention over ``query`` [B, H, L, D], ``key`` and ``value`` [B, Hk, L, D] (bf16),
    given ``grad_out`` [B, H, L, D] (any strides with D contiguous) and ``mask``: None or bool [B or 1, 1, L, L]."""
    import torch

    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    tensors = [t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value, grad_out)]
    strides = torch.tensor([s for t in tensors for s in t.stride()[:3]], dtype=torch.int64)
    mask_rows, mask_batch = None, 0
    if mask is not None:
        mask_rows = mask[:, 0].contiguous()
        mask_batch = length * length if mask_rows.shape[0] > 1 else 0
    dq = torch.empty(batch, heads, length, dim, dtype=query.dtype)
    dk_t = torch.empty(batch, heads, dim, length, dtype=torch.float32)   # per query head, transposed
    dv_t = torch.empty_like(dk_t)
    if library().qlorax_attention_backward(*map(pointer, tensors), pointer(mask_rows), mask_batch, pointer(strides),
                                           *map(pointer, (dq, dk_t, dv_t)), batch, heads, kv_heads, length, dim, scale):
        raise MemoryError(f"AMX attention backward: no memory for a thread's {length} x {length} buffers")
    group = (batch, kv_heads, heads // kv_heads, dim, length)
    dk, dv = (t.view(group).sum(2).transpose(2, 3).to(key.dtype, memory_format=torch.contiguous_format)
              for t in (dk_t, dv_t))
    return dq, dk, dv


@functools.cache   # made on first use: importing this module needs no torch
def _function():
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Attention(torch.autograd.Function):
        """transformers' SDPA forward (bit-identical); the backward on AMX tiles."""

        @staticmethod
        def forward(ctx, query, key, value, mask, module, scaling, kwargs):
            out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=0.0, scaling=scaling, **kwargs)
            ctx.save_for_backward(query, key, value, mask)
            ctx.scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            return out

        @staticmethod
        def backward(ctx, grad):   # grad: [B, L, H, D], the output's layout
            query, key, value, mask = ctx.saved_tensors
            dq, dk, dv = backward(query, key, value, grad.transpose(1, 2), mask, ctx.scale)
            return dq, dk, dv, None, None, None, None

    return Attention


# ------------------------------------------------------------------ transformers' attention interface
def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention call (``AttentionInterface``): the tile backward where ``takes`` says it can run,
    else transformers' SDPA as it is."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout == 0.0 and takes(module, query, key, value, attention_mask, kwargs):
        return _function().apply(query, key, value, attention_mask, module, scaling, kwargs), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def takes(module, query, key, value, mask, kwargs) -> bool:
    """The tile backward can run this call (see the module docstring)."""
    import torch

    if not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)):
        return False
    if any(kwargs.get(name) is not None for name in ("softcap", "position_bias", "s_aux", "sinks")):
        return False
    if not all(t.dtype == torch.bfloat16 and t.dim() == 4 and t.device.type == "cpu" for t in (query, key, value)):
        return False
    batch, heads, length, dim = query.shape
    if (dim % 32 or key.shape[2] != length or not 1 < length <= MAX_LENGTH or value.shape != key.shape
            or key.shape[-1] != dim or heads % key.shape[1] or key.shape[0] != batch):
        return False
    if mask is None:
        causal = kwargs.get("is_causal")
        return bool(getattr(module, "is_causal", True) if causal is None else causal)
    return (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[0] in (1, batch)
            and tuple(mask.shape[2:]) == (length, length) and not _beyond_causal(mask))


def _beyond_causal(mask) -> bool:
    """Some query may see a key after it (a row that sees nothing is fine: its P and gradients are zero)."""
    import torch

    length = mask.shape[-1]
    return bool((mask & torch.ones(length, length, dtype=torch.bool).triu(1)).any())


def enable(model) -> bool:
    """Make ``model`` (a transformers or peft model using SDPA) train through ``attention_forward``; False where the
    kernel is unavailable, transformers has no attention interface, or the model uses another implementation."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:   # transformers before 4.48 (the bigdl environment's): no attention interface to register with
        return False
    if library() is None:
        return False
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if (getattr(causal_lm.config, "_attn_implementation", None) != "sdpa"
            or not hasattr(causal_lm, "set_attn_implementation")):
        return False
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    causal_lm.set_attn_implementation(NAME)
    return causal_lm.config._attn_implementation == NAME
