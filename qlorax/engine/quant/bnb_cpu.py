"""Multi-threaded 4-bit dequantization for bitsandbytes on the CPU.

Training a 4-bit base dequantizes every weight twice per micro-batch (forward, and backward
for the input gradient). bitsandbytes' CPU kernel for that runs on one thread, so on an
N-core machine the other cores idle through ~10% of the step (TinyLlama-1.1B shape, batch 1).
qlorax's own kernel (``native``, bit-identical, AVX-512BW, bf16) splits the weight's blocks over torch's OpenMP
threads; elsewhere the weight's rows are split over a thread pool, calling bitsandbytes' kernel on each slice
(ctypes releases the GIL), giving bit-identical results.

Installed by overriding the CPU implementation of the ``bitsandbytes::dequantize_4bit`` op,
which both the forward (``gemm_4bit``) and the backward path call. Cases the fast path does
not cover fall back to bitsandbytes' generic implementation.

``linear4bit_forward`` replaces ``Linear4bit.forward`` for training on the CPU. On CPUs with AMX-BF16 both matmuls
run in ``amx_4bit``'s tile kernels, which decode the 4-bit weight inside the matmul (the same weight values; fp32
sums in another order), unless ``quant.bf16_matmul=torch`` (``use_tile_kernels``). Elsewhere it is the same
dequantize-then-matmul as bitsandbytes' ``MatMul4Bit`` (bit-identical results), but the dequantized weight goes into
one per-thread scratch buffer, reused by every layer. The weight only lives for one matmul, so a fresh 23 MB
allocation per weight, twice per step, is pure churn: it fragments the heap (peak RSS) and costs Python and
allocator time.
"""
from __future__ import annotations

import ctypes as ct
import functools
import logging
import os

from qlorax.engine.quant.native import run_row_slices, scratch

log = logging.getLogger("qlorax")
_INSTALLED = {"done": False}
_MIN_ROWS_PER_THREAD = 64


def _kernel(quant_type: str, dtype):
    import torch
    from bitsandbytes.cextension import lib

    suffix = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    if suffix is None or quant_type not in ("nf4", "fp4"):
        return None
    return getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{suffix}", None)


def dequantize_rows(packed, absmax, blocksize: int, quant_type: str, shape, dtype, threads: int, out=None):
    """Dequantize a [rows, cols] 4-bit weight (into ``out`` when given): qlorax's native kernel on torch's OpenMP
    threads where it applies, else bitsandbytes' kernel over ``threads`` row slices on a thread pool.

    Returns the dequantized weight, or None when the fast path does not apply.
    """
    import torch

    if len(shape) != 2 or absmax.dtype != torch.float32:
        return None
    rows, cols = int(shape[0]), int(shape[1])
    kernel = _kernel(quant_type, dtype)
    if kernel is None or cols % 2 or blocksize >= 2048:
        return None   # bitsandbytes' own fallbacks (odd widths, huge blocks)
    if cols % blocksize:
        threads = 1   # blocks straddle rows: one call over the whole weight, as bitsandbytes does
    packed = packed.view(torch.uint8).reshape(-1)
    if out is None:
        out = torch.empty((rows, cols), dtype=dtype)
    a_ptr, m_ptr, o_ptr = packed.data_ptr(), absmax.data_ptr(), out.data_ptr()
    fits = dtype == torch.bfloat16 and blocksize % 64 == 0 and not cols % blocksize   # whole 64-value blocks per row
    native = _native_dequant(quant_type) if fits else None
    if native is not None:   # same values, bit for bit; 0.45-0.76 ms per 5632 x 2048 weight against 0.9
        lib, code = native   # its blocks split over torch's OpenMP threads (native.FLAGS)
        lib.qlorax_dequant4_bf16(a_ptr, m_ptr, code.data_ptr(), o_ptr, 0, rows * cols, blocksize)
        return out
    blocks_per_row = cols // blocksize

    def run(lo, hi):
        kernel(ct.c_void_p(a_ptr + lo * cols // 2), ct.c_void_p(m_ptr + lo * blocks_per_row * 4),
               ct.c_void_p(o_ptr + lo * cols * out.element_size()), ct.c_longlong(blocksize),
               ct.c_longlong(hi - lo), ct.c_longlong(cols))

    run_row_slices(run, rows, threads, _MIN_ROWS_PER_THREAD)
    return out


@functools.cache
def _native_dequant(quant_type: str):
    """(qlorax's vectorized 4-bit -> bf16 kernel, the format's 16 values) where it builds with AVX-512BW, else None.

    bitsandbytes' CPU kernel looks each value up in a scalar loop: 0.9 ms per 5632 x 2048 weight on 2 cores, twice
    per weight per step. qlorax's does a block's 16 lookups with one vpermw per 32 values (``native``).
    """
    from bitsandbytes.backends.utils import _get_4bit_code

    from qlorax.engine.quant import native

    lib = native.library()
    if lib is None or not lib.qlorax_dequant4_vectorized():
        return None
    return lib, _get_4bit_code(quant_type, "cpu").float().contiguous()


def install() -> bool:
    """Route bitsandbytes' CPU 4-bit dequantization through the threaded version (idempotent)."""
    if _INSTALLED["done"]:
        return True
    if os.environ.get("QLORAX_SERIAL_DEQUANT") == "1":
        return False
    try:
        import torch
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        from bitsandbytes.cextension import lib
        from bitsandbytes.backends.utils import _get_4bit_code
    except ImportError:
        return False
    if not hasattr(lib, "cdequantize_blockwise_cpu_nf4_bf16"):
        return False

    def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
        out = dequantize_rows(A, absmax, blocksize, quant_type, shape, dtype, torch.get_num_threads())
        if out is not None:
            return out
        if A.dtype != torch.uint8:
            A = A.view(torch.uint8)
        return _dequantize_4bit_compute(A.reshape(-1), absmax, _get_4bit_code(quant_type, A.device), blocksize,
                                        shape, dtype)

    library = torch.library.Library("bitsandbytes", "IMPL")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "overriding a previously registered kernel" is the point
        library.impl("dequantize_4bit", dequantize_4bit, "CPU")
    _INSTALLED["done"] = True
    _INSTALLED["library"] = library   # keep the registration alive
    return True


# ------------------------------------------------------------------ training forward/backward
def _absmax(state):
    """The weight's fp32 block scales (double quantization's dequantized first)."""
    if not state.nested:
        return state.absmax
    from bitsandbytes import functional as F

    return (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


def _dequantize_scratch(weight, state):
    """The weight dequantized into this thread's scratch buffer for its shape: valid until the next call."""
    import torch
    from bitsandbytes import functional as F

    out = scratch(state.shape, state.dtype)
    done = dequantize_rows(weight, _absmax(state), state.blocksize, state.quant_type, state.shape, state.dtype,
                           torch.get_num_threads(), out=out)
    if done is None:
        F.dequantize_4bit(weight, state, out=out)
    return out


def _tile_kernels(tiles: bool, x, state):
    """``amx_4bit`` where it may (``tiles``) and can run this weight's matmuls for activations ``x``, else None."""
    from qlorax.engine.quant import amx_4bit

    return amx_4bit if tiles and amx_4bit.usable(state, x) else None


def use_tile_kernels(model, matmul: str) -> dict:
    """Set every bitsandbytes 4-bit layer's ``quant.bf16_matmul`` (auto: ``amx_4bit`` where it runs; torch: the
    whole-weight dequantization). Returns what runs, for the log and ``train_summary.json``: matmul amx (every 4-bit
    layer in the tile kernels), mixed or torch, with the count of layers in the tiles (with bf16 activations)."""
    import bitsandbytes as bnb

    from qlorax.engine.quant import amx_4bit

    layers = tiled = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.qlorax_tiles = matmul == "auto"
            state = getattr(module.weight, "quant_state", None)
            layers += 1
            tiled += bool(module.qlorax_tiles and state is not None and amx_4bit.fits(state))
    if tiled and amx_4bit.library() is None:
        tiled = 0
    return {"matmul": "torch" if not tiled else "amx" if tiled == layers else "mixed", "tile_layers": tiled,
            "layers": layers}


@functools.cache   # made on first use: importing this module needs no torch
def _dequant_linear():
    import torch

    class DequantLinear(torch.autograd.Function):
        """y = x @ dequant(W).T + b; the frozen 4-bit weight gets no gradient, as in MatMul4Bit. On AMX-BF16 the
        weight is decoded inside the tile kernels (``amx_4bit``); elsewhere dequantized whole into scratch."""

        @staticmethod
        def forward(ctx, x, weight, bias, state, tiles):
            ctx.weight, ctx.state, ctx.tiles = weight, state, tiles
            tiles = _tile_kernels(tiles, x, state)
            if tiles is None:
                w = _dequantize_scratch(weight, state)
                return torch.nn.functional.linear(x, w.to(x.dtype), bias)
            y = tiles.forward(x.reshape(-1, x.shape[-1]), weight, _absmax(state), state, bias)
            return y.reshape(*x.shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            grad_x = grad_bias = None
            if ctx.needs_input_grad[0]:
                tiles = _tile_kernels(ctx.tiles, grad, ctx.state)
                if tiles is None:
                    w = _dequantize_scratch(ctx.weight, ctx.state)
                    grad_x = torch.matmul(grad, w.to(grad.dtype))
                else:
                    grad_x = tiles.backward(grad.reshape(-1, grad.shape[-1]), ctx.weight, _absmax(ctx.state),
                                            ctx.state)
                    grad_x = grad_x.reshape(*grad.shape[:-1], grad_x.shape[-1])
            if ctx.needs_input_grad[2]:
                grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
            return grad_x, None, grad_bias, None, None

    return DequantLinear


def linear4bit_forward(module, x):
    """``Linear4bit.forward`` through ``DequantLinear`` (AMX tile kernels or the scratch buffer) on the CPU;
    bitsandbytes' own forward elsewhere."""
    state = getattr(module.weight, "quant_state", None)
    if (x.device.type != "cpu" or state is None or len(state.shape) != 2 or x.shape[-1] != state.shape[1]
            or getattr(state, "packing_format_for_cpu", False)):
        return type(module).forward(module, x)
    compute = module.compute_dtype or x.dtype
    bias = module.bias
    if bias is not None and bias.dtype != compute:
        bias = bias.to(compute)
    tiles = getattr(module, "qlorax_tiles", True)   # quant.bf16_matmul, set by ``use_tile_kernels``; auto otherwise
    return _dequant_linear().apply(x.to(compute), module.weight, bias, state, tiles).to(x.dtype)
