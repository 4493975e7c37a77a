"""LoRA dropout whose mask is never stored: each element's keep bit is a hash of its index and a per-call seed.

Dropout usually draws one random number per element and keeps the mask (or the dropped copy of the input)
for backward. Here a call draws one 32-bit seed from torch's default generator (so a checkpoint, which saves
that generator, still resumes bitwise) and keeps element ``i`` when ``hash32(i + seed) >= p * 2^32``; backward
hashes the same indices again. torch.compile fuses the hash, the compare and the scaling into one pass over
the tensor (read ``x``, write the dropped copy). On this project's 2-core machine a 256 x 2048 bf16 input
takes 0.21 ms against 0.95-1.2 ms to draw and apply a mask (256 x 5632: 0.47 against 2.5-3.4 ms), and
nothing is kept but 8 bytes. bf16 tensors take the same hash as a native loop (``lean_native``; 1024 x 2048:
0.32 against 1.24 ms compiled, on the AMX machine), bit-identical. Two seeds give pairwise independent masks (element ``i`` of one is element
``i + d`` of the other, d != 0).

Where compiling fails (no C++ compiler) the mask is drawn as before and kept, one byte per element
(``draw_keep_mask``: four 16-bit numbers per 64-bit draw, 0.50 against 1.34 ms for ``bernoulli_``).
Either way the caller gets a token for ``reapply``: the seed, or the mask.
"""
from __future__ import annotations

import functools
import logging

from qlorax.engine import lean_native

log = logging.getLogger("qlorax")
_RANDOM_BITS = 16
_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B   # the 32-bit integer hash's multiplier (< 2^27, so int64 products never overflow)


def drop(t, p: float):
    """(dropout of ``t`` at rate ``p``, token): ``reapply(other, token, p)`` drops the same elements of ``other``."""
    import torch

    kernel = _hashed_kernel()
    if kernel is None:
        keep = draw_keep_mask(t.shape, p)
        return apply_keep(t, keep, p), keep
    seed = new_seed()
    return kernel(t, seed, threshold(p), 1.0 / (1.0 - p)), seed


def new_seed():
    """A call's seed (an int64 tensor), drawn from torch's default generator."""
    import torch

    return torch.empty((), dtype=torch.int64).random_(0, 2 ** 32)


def reapply(t, token, p: float):
    """``t`` with the elements ``drop`` dropped for ``token`` zeroed and the rest scaled by 1 / (1 - p)."""
    import torch

    if token.dtype == torch.bool:
        return apply_keep(t, token, p)
    return _hashed_kernel()(t, token, threshold(p), 1.0 / (1.0 - p))


def threshold(p: float) -> int:
    """Elements whose hash is below this are dropped."""
    return round(p * 2 ** 32)


def hashed_dropout(t, seed, threshold: int, scale: float):
    """The eager reference of the fused kernel: ``t * scale`` where ``hash32(index + seed) >= threshold``, else 0."""
    import torch

    x = (torch.arange(t.numel(), dtype=torch.int64).view(t.shape) + seed) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MIX) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _MIX) & _MASK32
    x = x ^ (x >> 16)
    return torch.where(x >= threshold, t * scale, 0).to(t.dtype)


@functools.cache
def _hashed_kernel():
    """``hashed_dropout`` compiled (one pass), or None where compiling fails: then the mask is drawn and kept."""
    import torch

    try:
        compiled = torch.compile(hashed_dropout, dynamic=False)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)

        def kernel(t, seed, threshold, scale):
            if lean_native.usable(t) and not (t.requires_grad and torch.is_grad_enabled()):
                # bf16 inside an autograd function (no graph to record): the native loop, the same values (tested),
                # 3.8x the compiled one's speed
                return lean_native.hashed_dropout(t, seed, threshold, scale)
            rows = t.reshape(-1, t.shape[-1])   # [batch, seq, width] too: one kernel per width, any row count
            if rows.shape[0] > 1:
                torch._dynamo.mark_dynamic(rows, 0)
            return compiled(rows, seed, threshold, scale).view(t.shape)

        probe = torch.ones(3, 16, dtype=torch.bfloat16)   # the first call compiles; fall back if it cannot
        seed = torch.tensor(7, dtype=torch.int64)
        if not torch.equal(kernel(probe, seed, 1 << 31, 2.0), hashed_dropout(probe, seed, 1 << 31, 2.0)):
            raise RuntimeError("the compiled dropout kernel disagrees with its eager reference")
    except Exception as exc:   # no C++ compiler, unsupported platform
        log.warning("LoRA dropout: torch.compile of the hashed mask failed (%s); drawing and keeping the mask instead",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    return kernel


def draw_keep_mask(shape, p: float):
    """A bool mask, True with probability 1 - p (to 2^-16), from the default torch generator.

    Each 64-bit draw of the generator gives four 16-bit numbers: a quarter of the draws of one number per
    element (0.50 against 1.34 ms for 256 x 2048 on this project's 2-core machine).
    """
    import math

    import torch

    count = math.prod(shape)
    draws = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-2 ** 63, 2 ** 63 - 1)
    bits = draws.view(torch.int16)[:count].view(shape)
    return bits >= round(p * 2 ** _RANDOM_BITS) - 2 ** (_RANDOM_BITS - 1)


def apply_keep(t, keep, p: float):
    """``t`` where ``keep``, 0 elsewhere, scaled by 1 / (1 - p): dropout's forward, and its backward on the gradient."""
    import torch

    return torch.where(keep, t, 0).mul_(1.0 / (1.0 - p))
