#!/usr/bin/env python
"""Micro-benchmarks behind quant.compute=int8's design (README, "int8 compute"); prints figures, asserts nothing.

    python benchmarks/int8_micro.py layer [TOKENS]           # one base linear layer, forward + input gradient
    python benchmarks/int8_micro.py steps LAYERS BATCH ROUNDS # training steps of bf16 / nf4 / nf4_int8 / nf4_int4

Both run every variant in ONE process, interleaved in rounds, so a shared machine's drift hits all alike:
compare the ratios, not the absolute times.
"""
from __future__ import annotations

import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def interleave(cases: dict, rounds: int, label: str, tokens: int) -> None:
    """Time each case once per round (A B C A B C ...); print medians and their speed against the "bf16" case."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, run in cases.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    base = statistics.median(times["bf16"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{label} {name:<18} {median * 1e3:9.1f} ms  {tokens / median:8.1f} tok/s  {base / median:5.2f}x bf16  "
              f"rounds {[round(v, 3) for v in values]}", flush=True)


def layer_bench(M: int) -> None:
    """bf16, NF4 (bf16 compute), int8 unfused / fused, int4 -> int8 per use, NF4 -> int8 per use."""
    import bitsandbytes as bnb

    from qlorax.engine.quant import bnb_cpu, int8

    bnb_cpu.install()
    torch.manual_seed(0)
    for K, N in ((2048, 5632), (5632, 2048)):
        W = (torch.randn(N, K) * 0.02).to(torch.bfloat16)
        dense = torch.nn.Linear(K, N, bias=False).to(torch.bfloat16); dense.weight.data = W; dense.requires_grad_(False)
        l4 = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", quant_storage=torch.uint8)
        l4.weight = bnb.nn.Params4bit(W, requires_grad=False, blocksize=64, quant_type="nf4", quant_storage=torch.uint8, module=l4)._quantize("cpu")
        l4.support_avx512bf16_for_cpu = False; l4.forward = types.MethodType(bnb_cpu.linear4bit_forward, l4)
        i8u = int8.make_int8_linear(W.float(), fuse=False)
        i8f = int8.make_int8_linear(W.float(), fuse=True)
        x = torch.randn(M, K, dtype=torch.bfloat16); g = torch.randn(M, N, dtype=torch.bfloat16)
        def step(layer):
            xi = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(xi)
            y.backward(g)
        def per_use():   # int8 weight made from the NF4 storage per use (x2 per step) + int8 fwd/bwd
            w = bnb_cpu._dequantize_scratch(l4.weight, l4.weight.quant_state)
            int8.quantize_weight(w)
            w = bnb_cpu._dequantize_scratch(l4.weight, l4.weight.quant_state)
            int8.quantize_weight(w)
            step(i8f)
        i4 = int8.make_int8_linear(W.float(), fuse=True, storage="int4")
        cases = {"bf16": lambda: step(dense), "nf4-bf16": lambda: step(l4), "int8-unfused": lambda: step(i8u),
                 "int8-fused": lambda: step(i8f), "int4->int8 per use": lambda: step(i4), "nf4->int8 per use": per_use}
        for f in cases.values():
            f()
        interleave(cases, 7, f"M={M} {K}->{N}", M)


def step_bench(layers: int, batch: int, rounds: int, seq: int = 256) -> None:
    """Full training steps (TinyLlama-1.1B shape, ``layers`` layers) of each mode, interleaved."""
    from benchmarks.bench import build_model, random_batch
    from qlorax.engine.lm import autocast, loss_sum
    from qlorax.engine.model import attach_lora
    from qlorax.engine.quant import load_base_model, use_compute
    from qlorax.engine.train import prepare_for_training
    from qlorax.spec import compose

    modes = {"bf16": ["quant=none"], "nf4": ["quant=nf4"], "nf4_int8": ["quant=nf4", "quant.compute=int8"],
             "nf4_int4": ["quant=nf4", "quant.compute=int8", "quant.int8_weight=int4"]}
    path = build_model(layers)
    steps = {}
    for name, extra in modes.items():
        spec = compose([f"model.path={path}", *extra, "quant.int8_calibration_batches=1", "quant.int8_guard_batches=1"])
        model = attach_lora(load_base_model(spec, str(path), "bf16"), spec)
        params = prepare_for_training(model, spec, "bf16")
        opt = torch.optim.AdamW(params, lr=2e-4)
        ids, mask = random_batch({"batch": batch, "seq": seq}, model.config.vocab_size)
        use_compute(model, spec, [(ids, mask, ids)], [(ids, mask, ids)], "bf16")
        model.train()
        def step(model=model, params=params, opt=opt, ids=ids, mask=mask):
            with autocast("bf16"):
                s, c = loss_sum(model, ids, mask, ids)
            (s / c).backward(); del s
            opt.step(); opt.zero_grad(set_to_none=True)
        step()
        steps[name] = step
    interleave(steps, rounds, f"layers={layers} batch={batch}", batch * seq)


if __name__ == "__main__":
    if sys.argv[1:2] == ["layer"]:
        layer_bench(int(sys.argv[2]) if len(sys.argv) > 2 else 256)
    elif sys.argv[1:2] == ["steps"]:
        layer_count, batch_size, round_count = [int(a) for a in sys.argv[2:5]] + [4, 1, 5][len(sys.argv[2:5]):]
        step_bench(layer_count, batch_size, round_count)
    else:
        raise SystemExit(__doc__)
