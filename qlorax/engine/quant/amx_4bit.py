"""bf16 matmuls of a bitsandbytes 4-bit weight (NF4 or FP4) on AMX-BF16, decoded inside the tile kernel.

The default ``quant.compute=bf16`` path otherwise dequantizes each weight whole into a bf16 scratch buffer, twice per
step (forward and input gradient), and hands it to torch's matmul, which on a plain bf16 weight reorders it into
oneDNN's tile layout on every call. Both passes write and read a bf16 copy of the weight (23 MB for 5632 x 2048)
through memory. The kernels here read the 4-bit weight as it lies and decode it straight into the tile operands in
L1/L2, the same values bit for bit (``native``'s ``qlorax_dequant4_bf16``: code[nibble] * absmax rounded to
nearest even, one vpermw per 32 values; the conversion here flushes products below 1.2e-38 to zero, which the tile
unit would flush as inputs anyway):

- forward ``y = x @ W.T``: 32 rows of W at a time are decoded into a panel, the A operand as it lies (16 rows x 32
  values per tile load); x is laid out as the B operand (2 consecutive columns of 16 rows per dword: ``vnni_block``
  on bf16 rows); the product is y's transpose, turned back in the epilogue (``transpose16``), as in ``amx``.
- input gradient ``dx = dy @ W``: dy's rows are the A operand as they lie; W is decoded into the B operand (2 rows
  interleaved value by value) one L2-sized block at a time: a strip of dx's columns, a range of W's rows
  (``blocking``), the strip's fp32 sums kept across its blocks, so dy is read once per strip.

Each kernel decodes the next panel or block while the tile unit multiplies the current one (the tile product calls
back after each step): the vector and tile units work side by side.

Both split their output columns over torch's own OpenMP threads and accumulate in fp32, as oneDNN does; the sums
run in another order, so results agree with dequantize-then-matmul to fp32 rounding, not bit for bit.

Used where the CPU reports AMX-BF16, the kernels build, activations are bf16 (bf16 compute), and the weight is 2-D
with in_features a multiple of 64 and of the block size (a multiple of 64) and out_features a multiple of 32
(``fits``, ``usable``; where blocks straddle rows bitsandbytes' CPU layout is not the flat one the kernels read: a
64 x 192 weight in blocks of 128 decoded wrong); elsewhere the scratch-buffer path runs. A bias is added in fp32
before the one rounding, as ``F.linear`` does.
"""
from __future__ import annotations

import functools

from qlorax.engine.quant import amx
from qlorax.engine.quant.native import pointer

SOURCE = r"""
/* A bitsandbytes 4-bit weight [N, K]: packed two values per byte, the first in the high nibble, flat row-major; one
   fp32 absmax per `blocksize` values (a multiple of 64); code: the format's 16 values (fp32). */
typedef struct { const uint8_t* packed; const float* absmax; const float* code; int64_t K, blocksize; } weight4_t;

/* Block b's 16 values, code[i] * absmax[b] rounded to bf16 (nearest even, as bitsandbytes rounds; the conversion
   flushes fp32 denormals, products below 1.2e-38, to zero), in both 256-bit halves: vpermw's table (an index's fifth
   bit then does not matter). */
static inline __m512i block_table(const weight4_t* W, int64_t b) {
    const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(W->code), _mm512_set1_ps(W->absmax[b]));
    const __m256i t = (__m256i)_mm512_cvtneps_pbh(v);
    return _mm512_inserti64x4(_mm512_castsi256_si512(t), t, 1);
}

/* 32 values from flat element e (even) on, looked up in `table`: byte i widened to a dword whose low word holds its
   high nibble and whose high word its low nibble (in the low 4 bits), then one vpermw. */
static inline __m512i decode32(const uint8_t* packed, int64_t e, __m512i table) {
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(packed + e / 2)));
    return _mm512_permutexvar_epi16(_mm512_or_si512(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(d, 16)), table);
}

/* Row r's 64 values at columns [k, k + 64) (k a multiple of 64: inside one block) into out[0..1]. */
static inline void decode64(const weight4_t* W, int64_t r, int64_t k, __m512i out[2]) {
    const int64_t e = r * W->K + k;
    const __m512i table = block_table(W, e / W->blocksize);
    out[0] = decode32(W->packed, e, table);
    out[1] = decode32(W->packed, e + 32, table);
}

TILE_PRODUCT(tile_product_bf16, float, _tile_dpbf16ps)

/* Decoding a panel of the forward's A operand, W's 32 rows from row n on ([32][ld] bf16), in units of one row times
   64 columns, spread over the tile products of the panel before it (as ``block_job``). */
typedef struct { const weight4_t* W; uint16_t* panel; int64_t n, ld, done, from, to; } panel_job;

static inline void decode_rows(panel_job* j, int64_t until) {
    const int64_t per_row = j->W->K / 64;
    for (; j->done < until; ++j->done) {
        const int64_t r = j->done / per_row, k = j->done % per_row * 64;
        __m512i v[2];
        decode64(j->W, j->n + r, k, v);
        _mm512_storeu_si512((void*)(j->panel + r * j->ld + k), v[0]);
        _mm512_storeu_si512((void*)(j->panel + r * j->ld + k + 32), v[1]);
    }
}

static void panel_hook(void* ctx, int64_t step, int64_t steps) {
    panel_job* j = (panel_job*)ctx;
    decode_rows(j, j->from + (j->to - j->from) * (step + 1) / steps);
}

/* Forward y [M, N] (bf16) = x @ W.T + bias (fp32, or NULL), output columns [n0, n1) (multiples of 32). Each 32-row
   panel of W is decoded (once per chunk of x's rows: ``amx.chunk_rows``) into one of `panels` ([32][K + 32] bf16:
   rows 4 KiB apart would share L1 sets), the A operand as it lies, the next panel into the other during this one's
   products; xp is x "vnni" ([Mp/16][K/2][16][2], Mp = M rounded up to 16). The tile product is y's transpose,
   turned in the epilogue. */
static void forward_columns(const weight4_t* W, const uint16_t* xp, const float* bias, uint16_t* y,
                            uint16_t* panels[2], int64_t M, int64_t N, int64_t K, int64_t chunk, int64_t n0,
                            int64_t n1) {
    configure();
    const int64_t Mp = (M + 15) / 16 * 16, ld = K + 32;
    float c[4][256] __attribute__((aligned(64)));
    const int64_t units = 32 * (K / 64);
    panel_job next = {W, panels[0], n0, ld, 0, 0, 0};
    decode_rows(&next, units);
    int64_t p = 0;
    for (int64_t mc = 0; mc < Mp; mc += chunk)
    for (int64_t n = n0; n < n1; n += 32, ++p) {
        const uint16_t* panel = next.panel;
        const int64_t nn = n + 32 < n1 ? n + 32 : n0;   /* the next panel: this chunk's next, or the next chunk's */
        const int more = n + 32 < n1 || mc + chunk < Mp;
        next = (panel_job){W, panels[(p + 1) & 1], nn, ld, 0, 0, 0};
        const int64_t todo = more ? units : 0;
        const int64_t m_end = mc + chunk < Mp ? mc + chunk : Mp;
        int64_t products = (m_end - mc + 31) / 32;
        for (int64_t m = mc; m < m_end; m += 32, --products) {
            const int two_m = m + 32 <= m_end;
            const uint16_t* b0 = xp + m * K;   /* block m/16: 16 rows of K values; 32 k: 16 lines of 64 bytes */
            next.from = next.done;
            next.to = next.done + (todo - next.done + products - 1) / products;
            tile_product_bf16(panel, panel + 16 * ld, 2 * ld, b0, b0 + 16 * K, 64, 1024, K / 32, 1, two_m, 0, c,
                              panel_hook, &next);
            for (int t = 0; t < 4; ++t) {
                const int tn = t >> 1, tm = t & 1;
                if (tm && !two_m) continue;
                const int64_t nb = n + 16 * tn, mb = m + 16 * tm;
                const __m512 b = bias ? _mm512_loadu_ps(bias + nb) : _mm512_setzero_ps();
                __m512i col[16];
                transpose16((const int32_t*)c[t], col);
                for (int j = 0; j < 16 && mb + j < M; ++j)   /* col[j][r] = y[mb + j][nb + r], rounded once */
                    store_bf16(y + (mb + j) * N + nb, _mm512_add_ps(_mm512_castsi512_ps(col[j]), b));
            }
        }
        decode_rows(&next, todo);
    }
    _tile_release();
}

/* A block of the input gradient's B operand: W's rows [n, n + rows) at columns [kc, kc + width), rows n + 2p and
   n + 2p + 1 interleaved value by value (block [rows/2][width][2]), decoded one pair of rows times 64 columns (a
   unit) at a time: `done` units so far, [from, to) the share of the tile product running now (``block_hook``). */
typedef struct { const weight4_t* W; uint16_t* block; int64_t kc, width, n, rows, units, done, from, to; } block_job;

static void decode_pairs(block_job* j, int64_t until) {
    /* value q of the two rows interleaved: lo takes values 0-15 of both, hi 16-31 */
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    const int64_t per_pair = j->width / 64;
    for (; j->done < until; ++j->done) {
        const int64_t p = j->done / per_pair, h = j->done % per_pair * 64;
        __m512i r0[2], r1[2];
        decode64(j->W, j->n + 2 * p, j->kc + h, r0);
        decode64(j->W, j->n + 2 * p + 1, j->kc + h, r1);
        uint16_t* o = j->block + (p * j->width + h) * 2;
        for (int q = 0; q < 2; ++q) {
            _mm512_storeu_si512((void*)(o + 64 * q), _mm512_permutex2var_epi16(r0[q], lo, r1[q]));
            _mm512_storeu_si512((void*)(o + 64 * q + 32), _mm512_permutex2var_epi16(r0[q], hi, r1[q]));
        }
    }
}

static void block_hook(void* ctx, int64_t step, int64_t steps) {
    block_job* j = (block_job*)ctx;
    decode_pairs(j, j->from + (j->to - j->from) * (step + 1) / steps);
}

/* The block after j's (the strip's next rows, else the next strip's first) into `block`; rows 0 where none is left. */
static block_job next_block(block_job j, uint16_t* block, int64_t N, int64_t k1, int64_t kc_max, int64_t nb_max) {
    if (j.n + j.rows >= N) { j.kc += kc_max; j.n = 0; } else j.n += j.rows;
    j.width = j.kc + kc_max <= k1 ? kc_max : k1 - j.kc;
    j.rows = j.kc >= k1 ? 0 : j.n + nb_max <= N ? nb_max : N - j.n;
    j.block = block;
    j.units = j.rows / 2 * (j.width / 64);
    j.done = j.from = j.to = 0;
    return j;
}

/* Input gradient dx [M, K] (bf16) = g @ W, output columns [k0, k1) (multiples of 64). g [M, N] bf16 is the A
   operand as it lies, its last, partial 16-row block (where M is not a multiple of 16) read from `tail` instead
   ([16][N], zero-padded: ``dy_rows``). W is decoded into the B operand one block at a time, a strip of `kc_max` of
   dx's columns times `nb_max` of W's rows (``blocking``), the next block into the other of `blocks` while the tile
   unit multiplies this one. A strip's fp32 sums stay in acc, its tile-sized C blocks ([ceil(Mp/32)][width/32][4][256]),
   across its row blocks, so each strip reads g once however many rows W has, and a block fits L2 beside the sums. */
static inline const uint16_t* dy_rows(const uint16_t* g, const uint16_t* tail, int64_t m, int64_t M, int64_t N) {
    return m + 16 <= M ? g + m * N : tail;   /* the 16 rows of g from row m on */
}

static void backward_columns(const weight4_t* W, const uint16_t* g, const uint16_t* tail, uint16_t* dx,
                             uint16_t* blocks[2], float* acc, int64_t M, int64_t N, int64_t K, int64_t kc_max,
                             int64_t nb_max, int64_t k0, int64_t k1) {
    configure();
    const int64_t Mp = (M + 15) / 16 * 16;
    block_job next = {W, blocks[0], k0 - kc_max, kc_max, 0, N, 0, 0, 0, 0};
    next = next_block(next, blocks[0], N, k1, kc_max, nb_max);   /* rows [0, nb_max) of the first strip */
    decode_pairs(&next, next.units);
    for (int64_t b = 0; next.rows; ++b) {
        const block_job now = next;
        next = next_block(now, blocks[(b + 1) & 1], N, k1, kc_max, nb_max);
        const int64_t stride = now.width * 4;   /* bytes per block row: a pair of W's rows */
        const int first = now.n == 0, last = now.n + now.rows == N;
        int64_t products = (Mp + 31) / 32 * (now.width / 32);
        float (*c)[4][256] = (float (*)[4][256])acc;
        for (int64_t m = 0; m < Mp; m += 32) {
            const int two_m = m + 32 <= Mp;
            const uint16_t* a0 = dy_rows(g, tail, m, M, N) + now.n;
            const uint16_t* a1 = two_m ? dy_rows(g, tail, m + 16, M, N) + now.n : a0;
            for (int64_t k = 0; k < now.width; k += 32, --products, ++c) {
                const int two_k = k + 32 <= now.width;
                const uint16_t* bk = now.block + k * 2;   /* 32 of W's rows: 16 block rows of `stride` bytes */
                next.from = next.done;
                next.to = next.done + (next.units - next.done + products - 1) / products;
                tile_product_bf16(a0, a1, 2 * N, bk, bk + 32, stride, 16 * stride, now.rows / 32, two_m,
                                  two_k, !first, *c, block_hook, &next);
                if (!last) continue;
                for (int t = 0; t < 4; ++t) {
                    const int tm = t >> 1, tk = t & 1;
                    if ((tm && !two_m) || (tk && !two_k)) continue;
                    const int64_t mb = m + 16 * tm, kb = now.kc + k + 16 * tk;
                    for (int i = 0; i < 16 && mb + i < M; ++i)
                        store_bf16(dx + (mb + i) * K + kb, _mm512_load_ps((*c)[t] + i * 16));
                }
            }
        }
        decode_pairs(&next, next.units);
    }
    _tile_release();
}

/* x [M, K] bf16 in the forward's B layout, out [Mp/16][K/2][16][2] (Mp = M rounded up to 16, padding rows zero). */
int qlorax_amx4_pack_rows(const uint16_t* x, uint16_t* out, int64_t M, int64_t K) {
    int failed = 0;
    #pragma omp parallel for schedule(static) reduction(|: failed) if (M >= 256)
    for (int64_t b = 0; b < (M + 15) / 16; ++b) {
        const uint16_t* rows = x + 16 * b * K;
        if (16 * b + 16 > M) {   /* the last, partial block: copied and zero-padded first */
            static __thread int8_t* buffer = NULL;
            static __thread int64_t capacity = 0;
            uint16_t* padded = (uint16_t*)thread_buffer(&buffer, &capacity, 32 * K);
            if (!padded) { failed = 1; continue; }
            memset(padded, 0, 32 * K);
            memcpy(padded, rows, (M - 16 * b) * K * 2);
            rows = padded;
        }
        vnni_block((const int8_t*)rows, 2 * K, (int8_t*)(out + 16 * b * K));
    }
    return failed;
}

int qlorax_amx4_forward(const uint8_t* packed, const float* absmax, const float* code, int64_t blocksize,
                        const uint16_t* xp, const float* bias, uint16_t* y, int64_t M, int64_t N, int64_t K,
                        int64_t chunk) {
    const weight4_t W = {packed, absmax, code, K, blocksize};
    int failed = 0;
    #pragma omp parallel reduction(|: failed)
    {
        static __thread int8_t* buffer = NULL;   /* two panels of 32 decoded rows */
        static __thread int64_t capacity = 0;
        uint16_t* panels[2] = {(uint16_t*)thread_buffer(&buffer, &capacity, 128 * (K + 32)), NULL};
        int64_t lo, hi;
        share(N / 32, &lo, &hi);
        if (lo < hi && !panels[0]) failed = 1;
        else if (lo < hi) {
            panels[1] = panels[0] + 32 * (K + 32);
            forward_columns(&W, xp, bias, y, panels, M, N, K, chunk, lo * 32, hi * 32);
        }
    }
    return failed;   /* 1: a panel buffer could not be allocated */
}

/* dx [M, K] = backward_columns over all of K, split in 64-column blocks over the threads. nb_max a multiple of 32. */
int qlorax_amx4_backward(const uint8_t* packed, const float* absmax, const float* code, int64_t blocksize,
                         const uint16_t* g, const uint16_t* tail, uint16_t* dx, int64_t M, int64_t N, int64_t K,
                         int64_t kc_max, int64_t nb_max) {
    const weight4_t W = {packed, absmax, code, K, blocksize};
    const int64_t Mp = (M + 15) / 16 * 16, sums = (Mp + 31) / 32 * (kc_max / 32) * 4096;
    int failed = 0;
    #pragma omp parallel reduction(|: failed)
    {
        static __thread int8_t* buffer = NULL;   /* two blocks of nb_max x kc_max values, then the sums */
        static __thread int64_t capacity = 0;
        int8_t* mine = thread_buffer(&buffer, &capacity, 4 * nb_max * kc_max + sums);
        int64_t lo, hi;
        share(K / 64, &lo, &hi);
        if (lo < hi && !mine) failed = 1;
        else if (lo < hi) {
            uint16_t* blocks[2] = {(uint16_t*)mine, (uint16_t*)(mine + 2 * nb_max * kc_max)};
            backward_columns(&W, g, tail, dx, blocks, (float*)(mine + 4 * nb_max * kc_max), M, N, K, kc_max, nb_max,
                             lo * 64, hi * 64);
        }
    }
    return failed;   /* 1: the block and sum buffers could not be allocated */
}
#ifdef __cplusplus
}
#endif
"""

SUM_BYTES = 1024 * 1024     # the backward's fp32 sums of one strip of dx's columns
BLOCK_BYTES = 384 * 1024    # the backward's block of decoded W (rows x strip columns): two, besides the sums, in L2
LONG_BLOCK_ROWS = 2048      # ... where dy has more than 512 rows: W's rows per block, at most


@functools.cache
def library():
    """The kernels (a ctypes library), or None where the CPU has no AMX-BF16 or they do not build."""
    return build(SOURCE, "qlorax_amx4",
                 "AMX 4-bit kernels unavailable; 4-bit weights are dequantized whole for each matmul")


def build(source: str, stem: str, unavailable: str):
    """``source`` (``SOURCE`` or a variant of it: ``benchmarks/amx4_micro.py``) built as ``stem`` with its functions'
    signatures; None, warning ``unavailable``, where it cannot run (``amx.load_tile_library``)."""
    import ctypes

    lib = amx.load_tile_library(source, stem, "amx_bf16", unavailable)
    if lib is None:
        return None
    address, size = ctypes.c_void_p, ctypes.c_int64
    lib.qlorax_amx4_pack_rows.argtypes = [address] * 2 + [size] * 2
    lib.qlorax_amx4_forward.argtypes = [address] * 3 + [size] + [address] * 3 + [size] * 4
    lib.qlorax_amx4_backward.argtypes = [address] * 3 + [size] + [address] * 3 + [size] * 5
    for function in (lib.qlorax_amx4_pack_rows, lib.qlorax_amx4_forward, lib.qlorax_amx4_backward):
        function.restype = ctypes.c_int
    return lib


def fits(state) -> bool:
    """The kernels can take the 4-bit weight bitsandbytes' ``state`` describes (its shape and blocks; any dtype:
    the decoded values are rounded to bf16 once, as the fallback's ``w.to(bf16)`` rounds them)."""
    if len(state.shape) != 2 or state.quant_type not in ("nf4", "fp4"):
        return False
    outs, ins = (int(d) for d in state.shape)
    return ins % 64 == 0 and outs % 32 == 0 and state.blocksize % 64 == 0 and ins % state.blocksize == 0


def usable(state, x) -> bool:
    """The kernels run both matmuls of that weight for activations ``x``: bf16, at least one row, on AMX-BF16."""
    import torch

    return x.dtype == torch.bfloat16 and x.numel() > 0 and fits(state) and library() is not None


@functools.cache
def _code(quant_type: str):
    from bitsandbytes.backends.utils import _get_4bit_code

    return _get_4bit_code(quant_type, "cpu").float().contiguous()


def blocking(rows: int, outs: int) -> tuple[int, int]:
    """The backward's (dx columns per strip, W rows per block) for ``rows`` of dy and a weight of ``outs`` rows: 256
    columns where the strip's fp32 sums ([rows, columns]) fit ``SUM_BYTES`` (fewer, to 64, beyond); blocks of decoded
    values of at most ``BLOCK_BYTES``, or beyond 512 rows of dy, whose longer products hide a longer decode, of up to
    ``LONG_BLOCK_ROWS`` rows; as even as can be (multiples of 32 rows). On 2 cores of the AMX machine (ms, the input
    gradient of one weight; rows per block in brackets; 128 or 192 columns were slower at both): dy 256 x 5632 ->
    dx 2048 3.11 (768) / 3.30 (960) / 3.57 (1888); dy 1024 x 5632 -> 2048 11.86 (704) / 11.30 (960) / 10.85 (1888);
    dy 1024 x 2048 -> 5632 12.52 (704) / 11.76 (1024) / 11.86 (2048); dy 1024 x 2048 -> 2048 4.34 (704) / 4.24
    (1024) / 4.17 (2048). Whole blocks of a 5632-row weight (2.9 MB each) cost the 1.1B shape's batch 4 step a
    fifth of its speed (NF4 0.83x bf16 LoRA, against 1.04x)."""
    padded = -(-rows // 16) * 16
    columns = min(256, max(64, SUM_BYTES // (4 * padded) // 64 * 64))
    most = LONG_BLOCK_ROWS if padded > 512 else max(32, BLOCK_BYTES // (2 * columns) // 32 * 32)
    blocks = -(-outs // most)
    return columns, -(-outs // blocks // 32) * 32


def forward(x, packed, absmax, state, bias=None):
    """``x @ dequantize(W).T + bias`` in bf16, rounded once (x bf16 [M, K]; W bitsandbytes' 4-bit [N, K]: ``packed``,
    fp32 ``absmax``; ``bias`` [N] or None)."""
    import torch

    lib = library()
    rows, cols = x.shape
    outs = int(state.shape[0])
    x = x.contiguous()
    xp = torch.empty(-(-rows // 16) * 16 * cols, dtype=torch.bfloat16)
    if lib.qlorax_amx4_pack_rows(pointer(x), pointer(xp), rows, cols):
        raise MemoryError(f"AMX 4-bit forward: no memory for 32 x {cols} padded rows")
    y = torch.empty(rows, outs, dtype=torch.bfloat16)
    bias = None if bias is None else bias.float().contiguous()
    if lib.qlorax_amx4_forward(pointer(packed), pointer(absmax), pointer(_code(state.quant_type)), state.blocksize,
                               pointer(xp), pointer(bias), pointer(y), rows, outs, cols,
                               amx.chunk_rows(rows, cols, value_bytes=2)):
        raise MemoryError(f"AMX 4-bit forward: no memory for two 32 x {cols} panel buffers")
    return y


def backward(grad, packed, absmax, state):
    """``grad @ dequantize(W)`` in bf16: the input gradient of ``forward`` (grad bf16 [M, N])."""
    import torch

    lib = library()
    rows, outs = grad.shape
    cols = int(state.shape[1])
    grad = grad.contiguous()
    tail = None   # the tile loads read whole 16-row blocks: a partial last block is read from a zero-padded copy
    if rows % 16:
        tail = grad.new_zeros(16, outs)
        tail[: rows % 16] = grad[rows - rows % 16:]
    dx = torch.empty(rows, cols, dtype=torch.bfloat16)
    width, block = blocking(rows, outs)
    if lib.qlorax_amx4_backward(pointer(packed), pointer(absmax), pointer(_code(state.quant_type)), state.blocksize,
                                pointer(grad), pointer(tail), pointer(dx), rows, outs, cols, width, block):
        raise MemoryError(f"AMX 4-bit backward: no memory for two {block} x {width} blocks and their sums")
    return dx
