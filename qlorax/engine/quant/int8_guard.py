"""Turning int8 compute on for a loaded LoRA model, and the accuracy guard that decides whether it may train.

Per-token int8 is only as good as the activations allow: a few outlier channels (common in large LLMs)
set every token's scale and flatten its other channels to a handful of levels. So before training:

    1. held-out loss of the model as loaded (bf16 compute, the stored weights)
    2. calibration: per-channel max |x| of every base linear input over a few training batches
    3. every base linear layer -> Int8Linear, smoothed (SmoothQuant) by step 2
    4. held-out loss again, now in int8: the relative gap (int8 - bf16) / bf16 is logged, returned for
       train_summary.json, and training is refused when it exceeds ``quant.int8_max_loss_gap``.

LoRA's B starts at zero, so both losses are the base model's; the LoRA path itself stays in bf16.
"""
from __future__ import annotations

import logging

from qlorax.engine.lm import autocast, loss_sum
from qlorax.engine.quant import amx, int8
from qlorax.errors import QloraxError
from qlorax.schema import RunSpec

log = logging.getLogger("qlorax")


def mean_loss(model, batches, precision: str) -> float:
    """Token-mean cross-entropy over ``batches`` of (ids, mask, labels), eval mode, no gradients."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast(precision):
        for ids, mask, labels in batches:
            summed, n = loss_sum(model, ids, mask, labels)
            total, count = total + float(summed), count + n
    model.train(was_training)
    return total / max(count, 1)


def enable(model, spec: RunSpec, calibration_batches: list, held_out_batches: list, precision: str,
           dense_weight) -> dict:
    """Convert the base to int8 compute, measuring the held-out loss gap first; returns the guard's report.

    Raises QloraxError (naming the overrides) when the gap exceeds ``quant.int8_max_loss_gap``.
    ``dense_weight(layer, name)`` is the float weight of a stored base layer (4-bit ones dequantized, or read from
    the checkpoint).
    """
    import torch

    q = spec.quant
    skip = list(q.skip_modules)
    measured_on = "held-out" if held_out_batches else "training"
    held_out_batches = held_out_batches or calibration_batches
    bf16_loss = mean_loss(model, held_out_batches, precision)
    absmax = None
    if q.int8_smoothing > 0:
        def run_calibration():
            with torch.no_grad(), autocast(precision):
                for ids, mask, labels in calibration_batches:
                    loss_sum(model, ids, mask, labels)
        was_training = model.training
        model.eval()
        absmax = int8.calibrate(model, skip, run_calibration)
        model.train(was_training)
    layers = int8.convert(model, skip, dense_weight, absmax, q.int8_smoothing, q.int8_fuse, q.int8_weight,
                          q.int8_matmul)
    int8_loss = mean_loss(model, held_out_batches, precision)
    gap = (int8_loss - bf16_loss) / max(abs(bf16_loss), 1e-12)
    report = {"compute": "int8", "weight": q.int8_weight, "layers": layers, "smoothing": q.int8_smoothing,
              "calibration_batches": len(calibration_batches) if absmax is not None else 0,
              "guard_batches": len(held_out_batches), "guard_data": measured_on, "bf16_loss": bf16_loss,
              "int8_loss": int8_loss, "loss_gap": gap, "max_loss_gap": q.int8_max_loss_gap,
              "matmul": "amx" if q.int8_fuse and q.int8_matmul == "auto" and amx.library() is not None
              else "torch._int_mm"}
    # fused: the quantizers run as one pass each (the AMX kernels' own, else torch.compile'd)
    report["fused"] = q.int8_fuse and (report["matmul"] == "amx" or int8.compiles())
    log.info("quant.compute=int8: %d base linear layers in int8 (%s weights, smoothing %g, %s, %s); %s loss bf16 %.4f "
             "-> int8 %.4f: gap %+.2f%% (bound %.2f%%)", layers, q.int8_weight, q.int8_smoothing,
             "fused" if report["fused"] else "unfused", report["matmul"], measured_on, bf16_loss, int8_loss, 100 * gap,
             100 * q.int8_max_loss_gap)
    if gap > q.int8_max_loss_gap:
        hint = "" if q.int8_smoothing > 0 else " or smooth the outlier channels with quant.int8_smoothing=0.5"
        raise QloraxError(f"quant.compute=int8: the int8 base raises the {measured_on} loss by {100 * gap:.2f}% "
                          f"({bf16_loss:.4f} -> {int8_loss:.4f}), above quant.int8_max_loss_gap="
                          f"{q.int8_max_loss_gap:g}; train in bf16 with quant.compute=bf16{hint}, or continue "
                          f"anyway with quant.int8_max_loss_gap={_ceil(gap):g}")
    return report


def _ceil(gap: float) -> float:
    """A bound just above ``gap``, rounded up to 2 significant digits."""
    import math

    digits = 1 - int(math.floor(math.log10(abs(gap)))) if gap > 0 else 2
    return math.ceil(gap * 10 ** digits) / 10 ** digits
