#!/usr/bin/env python
"""Micro-benchmark behind ``quant.bf16_matmul`` (README, "4-bit weights decoded inside AMX-BF16 tile matmuls"): one
NF4 weight's two matmuls per training step; prints figures, asserts nothing. Needs a CPU with AMX-BF16.

    python benchmarks/amx4_micro.py [TOKENS ...]   # default: 256 1024

Per weight of the TinyLlama-1.1B shape, forward ``x @ W.T`` and input gradient ``dy @ W``, in ms:
- tiles: ``amx_4bit`` (the default on AMX), decoding the next panel or block while the tile unit multiplies;
- decode after: the same kernels with that overlap off (each panel or block decoded after the products before it);
- nf4 whole: the 4-bit weight dequantized whole into scratch, then torch's matmul (``quant.bf16_matmul=torch``);
- bf16: torch's matmul on an already-bf16 weight (what bf16 LoRA pays).
Every variant runs in ONE process, interleaved in rounds, so a shared machine's drift hits all alike.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(5632, 2048), (2048, 5632), (2048, 2048), (256, 2048)]   # (out, in): gate/up, down, q/o, k/v
ROUNDS = 15


def _decode_after():
    """``amx_4bit``'s library built with the tile products' decode hooks off."""
    from qlorax.engine.quant import amx_4bit

    source = amx_4bit.SOURCE
    for hook in ("panel_hook, &next", "block_hook, &next"):   # each kernel's one call with its hook
        assert source.count(hook) == 1, f"amx_4bit.SOURCE no longer calls the tile product with {hook!r}"
        source = source.replace(hook, "NULL, NULL")
    return amx_4bit.build(source, "qlorax_amx4_decode_after", "variant unavailable")


def main(tokens: list[int]) -> None:
    from bitsandbytes import functional as F

    from qlorax.engine.quant import amx_4bit, bnb_cpu

    if amx_4bit.library() is None:
        sys.exit("no AMX-BF16 on this CPU (or the kernels did not build): nothing to measure")
    libraries = {"tiles": amx_4bit.library(), "decode after": _decode_after()}
    original = amx_4bit.library
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {ROUNDS} rounds, median ms")
    for rows in tokens:
        for outs, ins in SHAPES:
            torch.manual_seed(0)
            packed, state = F.quantize_4bit(torch.randn(outs, ins, dtype=torch.bfloat16) * 0.02, blocksize=64,
                                            quant_type="nf4", quant_storage=torch.uint8)
            dense = F.dequantize_4bit(packed, state).to(torch.bfloat16).contiguous()
            x, dy = torch.randn(rows, ins, dtype=torch.bfloat16), torch.randn(rows, outs, dtype=torch.bfloat16)
            cases = {}
            for name, lib in libraries.items():   # amx_4bit.forward/backward call library() when they run
                cases[name] = (lambda: amx_4bit.forward(x, packed, state.absmax, state),
                               lambda: amx_4bit.backward(dy, packed, state.absmax, state), lib)
            cases["nf4 whole"] = (lambda: torch.nn.functional.linear(x, bnb_cpu._dequantize_scratch(packed, state)),
                                  lambda: dy @ bnb_cpu._dequantize_scratch(packed, state), None)
            cases["bf16"] = (lambda: torch.nn.functional.linear(x, dense), lambda: dy @ dense, None)
            times = {name: ([], []) for name in cases}
            for _ in range(ROUNDS):
                for name, (forward, backward, lib) in cases.items():
                    amx_4bit.library = (lambda lib=lib: lib) if lib is not None else original
                    for run, kept in zip((forward, backward), times[name]):
                        started = time.perf_counter()
                        run()
                        kept.append(time.perf_counter() - started)
            amx_4bit.library = original
            figures = "  ".join(f"{name} {statistics.median(f) * 1e3:.2f} / {statistics.median(b) * 1e3:.2f}"
                                for name, (f, b) in times.items())
            print(f"{rows:5d} x {outs} x {ins} (forward / input gradient): {figures}", flush=True)


if __name__ == "__main__":
    main([int(t) for t in sys.argv[1:]] or [256, 1024])
