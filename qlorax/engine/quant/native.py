"""Small native kernels, run over row slices on a thread pool, and the per-thread scratch buffer they write into.

Some per-use weight transforms are simple loops that torch has no op for and that inductor compiles badly:
unpacking the int4-stored weight of ``quant.compute=int8`` (nibble times its group's multiplier) took
8.3 ms per 5632 x 2048 weight as a torch.compile'd kernel (inductor runs int8 shifts and multiplies 16
lanes at a time, emulated), about as long as the int8 matmul it feeds; the C loop below takes 0.45 ms
on 2 cores (memory bound). The C source is compiled once per machine with the C/C++ compiler that
torch.compile needs anyway (``-O3 -march=native -fopenmp``), cached by source, compiler and CPU flags, and
loaded with ctypes after torch, so its OpenMP loops run on torch's own threads (``FLAGS``). Where no compiler
works, ``library()`` is None and callers use their torch version (with a warning, once).

The second kernel dequantizes bitsandbytes' NF4/FP4 weights to bf16 for the default bf16-compute path
(``bnb_cpu``), bit-identical to bitsandbytes' own CPU kernel, which looks values up one at a time:
0.45-0.76 ms per 5632 x 2048 weight against 0.9 ms, with AVX-512BW (elsewhere bitsandbytes' kernel runs).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger("qlorax")

SOURCE = r"""
#include <stdint.h>
#ifdef __AVX512BW__
#include <immintrin.h>
#endif
#ifdef __cplusplus
extern "C" {
#endif
/* Rows [r0, r1) of an int4-stored weight to int8: packed [rows, K/2] bytes, two weights each (low nibble
   first, offset 8), times their group's multiplier mult [rows, K/64] -> out [rows, K]. */
void qlorax_unpack_int4(const uint8_t* packed, const uint8_t* mult, int8_t* out, int64_t r0, int64_t r1,
                        int64_t K) {
    const int64_t groups = K / 64;
    #pragma omp parallel for schedule(static) if (r1 - r0 >= 256)
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* p = packed + r * (K / 2);
        const uint8_t* m = mult + r * groups;
        int8_t* o = out + r * K;
        for (int64_t g = 0; g < groups; ++g) {
            const int8_t mg = (int8_t)m[g];
            const uint8_t* pg = p + g * 32;
            int8_t* og = o + g * 64;
            for (int j = 0; j < 32; ++j) {
                const uint8_t b = pg[j];
                og[2 * j] = (int8_t)(((int8_t)(b & 15) - 8) * mg);
                og[2 * j + 1] = (int8_t)(((int8_t)(b >> 4) - 8) * mg);
            }
        }
    }
}

/* 1 where qlorax_dequant4_bf16 runs vectorized (AVX-512BW); its scalar loop is slower than bitsandbytes' own. */
int qlorax_dequant4_vectorized(void) {
#ifdef __AVX512BW__
    return 1;
#else
    return 0;
#endif
}

/* Elements [e0, e1) (whole blocks; blocksize a multiple of 64) of a bitsandbytes 4-bit weight (NF4 or FP4) to
   bf16: two elements per byte, the first in the high nibble; value = code[nibble] * absmax[block], rounded to
   nearest even, as bitsandbytes computes it. The block's 16 values go in one register; vpermw looks them up. */
void qlorax_dequant4_bf16(const uint8_t* packed, const float* absmax, const float* code, uint16_t* out,
                          int64_t e0, int64_t e1, int64_t blocksize) {
    #pragma omp parallel for schedule(static) if (e1 - e0 >= (1 << 19))
    for (int64_t b = e0 / blocksize; b < e1 / blocksize; ++b) {
#ifdef __AVX512BW__
        __m512i u = _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(absmax[b])));
        __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
        const __m512i table = _mm512_castsi256_si512(_mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
        const __m256i low4 = _mm256_set1_epi8(0x0F);
        for (int64_t e = b * blocksize; e < (b + 1) * blocksize; e += 64) {
            const __m256i bytes = _mm256_loadu_si256((const __m256i*)(packed + e / 2));
            const __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
            const __m256i low = _mm256_and_si256(bytes, low4);
            const __m256i a = _mm256_unpacklo_epi8(high, low), c = _mm256_unpackhi_epi8(high, low);
            const __m256i first = _mm256_permute2x128_si256(a, c, 0x20), second = _mm256_permute2x128_si256(a, c, 0x31);
            _mm512_storeu_si512((void*)(out + e), _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(first), table));
            _mm512_storeu_si512((void*)(out + e + 32), _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(second), table));
        }
#else
        uint16_t table[16];
        for (int i = 0; i < 16; ++i) {
            union { float f; uint32_t u; } v;
            v.f = code[i] * absmax[b];
            table[i] = (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
        }
        for (int64_t e = b * blocksize; e < (b + 1) * blocksize; e += 2) {
            const uint8_t byte = packed[e / 2];
            out[e] = table[byte >> 4];
            out[e + 1] = table[byte & 15];
        }
#endif
    }
}
#ifdef __cplusplus
}
#endif
"""
# bf16 <-> fp32 (16 values, or one), a vectorized exp and LoRA dropout's hash for the AVX-512 (BF16) sources
# (``amx``, ``lean_native``, ``attention``, ``lora_native``), which put it after their includes: bf16 values as fp32,
# fp32 back to bf16 rounded to nearest even (as torch rounds), exp(x) to ~1e-7 relative, and 16 dropout keep bits.
BF16_HELPERS = r"""
static inline __m512 bf16_to_ps(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
static inline __m512 load_bf16(const uint16_t* p) { return bf16_to_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }
static inline void store_bf16(uint16_t* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, to_bf16(v)); }
static inline float bf16_to_float(uint16_t h) { union { uint32_t u; float f; } v; v.u = (uint32_t)h << 16; return v.f; }
static inline uint16_t float_to_bf16(float f) {   /* nearest even, one value */
    union { float f; uint32_t u; } v;
    v.f = f;
    return (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
}
/* exp(x), x clamped to [-87, 88]: 2^n p(r), r = x - n ln2 in [-ln2/2, ln2/2], p of degree 6 (relative error ~1e-7). */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* LoRA dropout's keep bits (``dropout.hashed_dropout``) of flat indices i .. i + 15: hash32((i + seed) mod 2^32)
   >= threshold (threshold <= 2^32 - 1: something is kept). */
static inline __mmask16 dropout_keep16(int64_t i, int64_t seed, __m512i threshold) {
    const __m512i mix = _mm512_set1_epi32(0x45D9F3B), lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i x = _mm512_add_epi32(_mm512_set1_epi32((int32_t)(uint32_t)((uint64_t)i + (uint64_t)seed)), lanes);
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, mix);
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, mix);
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    return _mm512_cmpge_epu32_mask(x, threshold);
}
"""
COMPILERS = ("g++", "c++", "gcc", "cc")
# -fopenmp: the loops split over torch's own OpenMP threads (the library is loaded after torch, so it binds to the
# libgomp torch loaded). A pool of threads of our own ran 1.3-1.4x slower inside a training step: torch's
# workers spin for a while after each of its ops and took the cores our threads needed.
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-fopenmp")


# ---------------------------------------------------------------- building and loading
@functools.cache
def library():
    """The compiled kernels (a ctypes library), or None where nothing can compile them (logged once)."""
    import ctypes

    if os.environ.get("QLORAX_NATIVE_KERNELS") == "0":
        return None
    try:
        import torch  # noqa: F401  (loaded first: the kernels then share its OpenMP runtime and threads)

        path = _built()
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:   # SubprocessError: a compiler that hangs
        log.warning("native kernels unavailable (%s); int4 weights unpack with torch ops, several times slower, and "
                    "4-bit weights dequantize with bitsandbytes' kernel",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    lib.qlorax_dequant4_bf16.restype = None
    lib.qlorax_dequant4_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    lib.qlorax_dequant4_vectorized.restype = ctypes.c_int
    lib.qlorax_unpack_int4.restype = None
    lib.qlorax_unpack_int4.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    return lib


def pointer(t):
    """A tensor's data pointer for a ctypes call (NULL for None)."""
    import ctypes

    return ctypes.c_void_p(None if t is None else t.data_ptr())


def load_extension(source: str, stem: str, required_flags: set[str], unavailable: str):
    """Another kernel source's library (``amx``, ``lean_native``, ``attention``, ``lora_native``): built like
    ``library()``'s, with ``BF16_HELPERS`` after its includes (``source`` is (includes, body)); None, with a warning
    saying ``unavailable``, where the CPU lacks ``required_flags``, native kernels are off or unbuildable, or this
    source does not build."""
    import ctypes

    if not required_flags <= set(_cpu_flags().split()) or library() is None:
        return None
    includes, body = source
    try:
        import torch  # noqa: F401  (loaded first: the kernels then share its OpenMP runtime and threads)

        return ctypes.CDLL(str(_built(includes + BF16_HELPERS + body, stem)))
    except (OSError, RuntimeError) as exc:
        log.warning("%s (%s)", unavailable, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


def _built(source: str = SOURCE, stem: str = "qlorax_kernels", extra_flags: tuple[str, ...] = ()) -> Path:
    """The shared library of ``source`` for this machine: from the cache, or compiled into it (atomically: ranks
    may race)."""
    compiler = _compiler()
    said = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    version = said.splitlines()[:1]
    key = hashlib.sha256("\n".join([source, compiler, *version, *FLAGS, *extra_flags, platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{stem}_{key}.so"
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(target.parent)
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        source_file = Path(work, "kernels.c")
        source_file.write_text(source)
        built = Path(work, target.name)
        done = subprocess.run([compiler, *FLAGS, *extra_flags, str(source_file), "-o", str(built)],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(f"{compiler} failed{': ' + said[-1] if said else f' (exit {done.returncode})'}")
        os.replace(built, target)
    return target


def _check_private(directory: Path) -> None:
    """A library loaded from a directory someone else can write to runs their code: refuse it."""
    info = directory.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise RuntimeError(f"the kernel cache {directory} is not private to this user (owner uid {info.st_uid}, "
                           f"mode {oct(info.st_mode & 0o777)}); set QLORAX_KERNEL_CACHE to a directory only you "
                           "can write")


def _compiler() -> str:
    for name in (os.environ.get("CXX"), os.environ.get("CC"), *COMPILERS):
        found = shutil.which(name) if name else None
        if found:
            return found
    raise RuntimeError(f"no C compiler on PATH (tried {', '.join(COMPILERS)}; install g++)")


def cache_dir() -> Path:
    """``$QLORAX_KERNEL_CACHE``, else ``kernels/`` in qlorax's cache (``$QLORAX_CACHE``), else the temp dir."""
    from qlorax.engine.tiny import cache_root

    if os.environ.get("QLORAX_KERNEL_CACHE"):
        return Path(os.environ["QLORAX_KERNEL_CACHE"])
    home = cache_root() / "kernels"
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"qlorax-kernels-{os.getuid()}"


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` builds for them): a different CPU gets its own build."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


# ---------------------------------------------------------------- running over rows
_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="qlorax-native")
    return _POOLS[threads]


def run_row_slices(run, rows: int, threads: int, min_rows: int) -> None:
    """``run(lo, hi)`` over ``threads`` slices of ``rows`` (at least ``min_rows`` each), in parallel.

    The calling thread takes the first slice itself: one pool hand-off fewer.
    """
    step = max(min_rows, -(-rows // max(1, threads)))
    slices = [(start, min(rows, start + step)) for start in range(0, rows, step)]
    pending = [_pool(threads).submit(run, *bounds) for bounds in slices[1:]]
    run(*slices[0])
    for job in pending:
        job.result()


_SCRATCH = threading.local()


def scratch(shape, dtype):
    """A view of this thread's one scratch buffer for ``dtype`` (grown to the largest size asked for).

    For a weight that lives for one matmul: reusing one buffer avoids a fresh multi-MB allocation per layer,
    twice per step, which fragments the heap (peak RSS) and costs allocator time. Valid until the next call.
    """
    import torch

    numel = int(shape[0]) * int(shape[1])
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    if dtype not in buffers or buffers[dtype].numel() < numel:
        buffers.pop(dtype, None)   # free the smaller buffer before allocating its replacement
        buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buffers[dtype][:numel].view(int(shape[0]), int(shape[1]))


# ---------------------------------------------------------------- kernels
def unpack_int4(packed, group_mult):
    """The native ``int8.unpack_int4`` (where ``library()`` built): an int4-stored weight's int8 form, in scratch."""
    import ctypes

    import torch

    lib = library()
    rows, cols = packed.shape[0], packed.shape[1] * 2
    packed, group_mult = packed.contiguous(), group_mult.contiguous()
    out = scratch((rows, cols), torch.int8)
    lib.qlorax_unpack_int4(ctypes.c_void_p(packed.data_ptr()), ctypes.c_void_p(group_mult.data_ptr()),
                           ctypes.c_void_p(out.data_ptr()), 0, rows, cols)   # rows split over torch's threads
    return out
