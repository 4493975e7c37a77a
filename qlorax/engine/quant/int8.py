"""int8 compute for the frozen base (``quant.compute=int8``): both matmuls of a base linear layer in int8.

The base is frozen, so each of its linear layers runs two matmuls per step: forward ``x @ W.T`` and the
input gradient ``dy @ W`` (no weight gradient). Both go through ``torch._int_mm`` (int8 x int8 -> int32,
VNNI / AMX-INT8 on Xeons, ~2x the bf16 rate):

    forward   W ~ diag(sw) Wq            per-output-channel int8 weight (kept, 1 byte per weight)
              x' = x * inv_s ~ diag(sx) xq  per-token (row-wise) dynamic int8, smoothed columns
              y  = (xq @ Wq.T) * sx * sw   int32 accumulator scaled back in the epilogue
    backward  dy * sw ~ diag(sd) dq       the weight scale folded into dy's columns, then row-wise int8
              dx = (dq @ Wq) * sd * inv_s

That is SwitchBack (Wortsman et al. 2023) without its weight gradient. ``s`` is SmoothQuant's
per-input-channel smoothing (Xiao et al. 2023): activation outlier channels, which per-token int8 would
otherwise flatten every other channel of the token into, are divided down and the weight's matching
columns multiplied up (``s_j = max|x_j|^a / max|W_j|^(1-a)``, from a calibration pass over training
batches; ``a = quant.int8_smoothing``, 0 disables it).

The int8 weight is made once from the stored weight (4-bit dequantized, or bf16) and kept: making it
from the 4-bit storage per use costs more than int8 saves (README, "int8 compute").
The row-wise quantizer and the epilogue are fused with torch.compile when ``quant.int8_fuse`` is on
(eager reference otherwise; tests hold the two together).
"""
from __future__ import annotations

import functools
import logging
import os

log = logging.getLogger("qlorax")
INT8_MAX = 127.0


# ------------------------------------------------------------------ the row-wise quantizer and the epilogue
def quantize_rows(x, col_scale):
    """``x * col_scale`` ([M, K] times [K]) as int8 rows and their fp32 scales: (q [M, K], scale [M, 1])."""
    import torch

    scaled = x.float() * col_scale
    amax = scaled.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    q = torch.clamp(torch.round(scaled * (INT8_MAX / amax)), -INT8_MAX, INT8_MAX).to(torch.int8)
    return q, amax / INT8_MAX


def scale_accumulator(acc, row_scale, col_scale, dtype):
    """int32 ``acc`` [M, N] * row_scale [M, 1] * col_scale [N], in ``dtype``."""
    return (acc.float() * row_scale * col_scale).to(dtype)


@functools.cache
def _fused():
    """torch.compile'd quantizer and epilogue (one pass over memory each), or None where compiling fails."""
    import torch

    if os.environ.get("QLORAX_INT8_FUSE") == "0":
        return None
    try:
        quantize = torch.compile(quantize_rows, dynamic=True, fullgraph=True)
        epilogue = torch.compile(scale_accumulator, dynamic=True, fullgraph=True)
        probe = torch.randn(3, 24, dtype=torch.bfloat16)   # a first call compiles; fall back if it cannot
        q, s = quantize(probe, torch.ones(24))
        epilogue(torch._int_mm(q.repeat(6, 1), q.t().contiguous()), s.repeat(6, 1), torch.ones(3), torch.bfloat16)
    except Exception as exc:   # no C++ compiler, unsupported platform: the eager ops are correct, only slower
        log.warning("quant.int8_fuse: torch.compile of the int8 quantizers failed (%s); running them unfused",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    return quantize, epilogue


def kernels(fuse: bool):
    """(quantize_rows, scale_accumulator): compiled when ``fuse`` and compiling works, else the eager ones."""
    fused = _fused() if fuse else None
    return fused if fused is not None else (quantize_rows, scale_accumulator)


# ------------------------------------------------------------------ weights
def quantize_weight(weight, smooth=None):
    """A float [N, K] weight (times the per-input-channel ``smooth``) as per-output-channel int8.

    Returns (int8 [N, K], scale fp32 [N]); the int8 weight times its row's scale approximates the weight.
    """
    q, scale = quantize_rows(weight, smooth if smooth is not None else _ones(weight.shape[1]))
    return q, scale.reshape(-1)


def _ones(n: int):
    import torch

    return torch.ones(n, dtype=torch.float32)


@functools.cache   # made on first use: importing this module needs no torch
def _int8_matmul():
    import torch

    class Int8Matmul(torch.autograd.Function):
        """y = x @ W.T with int8 x and int8 W (frozen: no weight gradient); dx = dy @ W in int8 too."""

        @staticmethod
        def forward(ctx, x, layer, out_dtype):
            quantize, epilogue = kernels(layer.fuse)
            q, row_scale = quantize(x, layer.inv_smooth)
            out = epilogue(torch._int_mm(q, layer.weight.t()), row_scale, layer.weight_scale, out_dtype)
            ctx.layer, ctx.grad_dtype = layer, x.dtype
            return out

        @staticmethod
        def backward(ctx, grad):
            layer = ctx.layer
            quantize, epilogue = kernels(layer.fuse)
            q, row_scale = quantize(grad.contiguous(), layer.weight_scale)
            grad_x = epilogue(torch._int_mm(q, layer.weight), row_scale, layer.inv_smooth, ctx.grad_dtype)
            return grad_x, None, None

    return Int8Matmul


def _module_class():
    import torch

    class Int8Linear(torch.nn.Module):
        """A frozen linear layer that computes in int8 (``quant.compute=int8``); see the module docstring."""

        def __init__(self, weight_int8, weight_scale, inv_smooth, bias, fuse: bool):
            super().__init__()
            self.out_features, self.in_features = weight_int8.shape
            self.weight = torch.nn.Parameter(weight_int8, requires_grad=False)
            self.register_buffer("weight_scale", weight_scale.float().contiguous())
            self.register_buffer("inv_smooth", inv_smooth.float().contiguous())
            self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
            self.fuse = fuse

        def forward(self, x):
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
            shape = x.shape
            with torch.autocast("cpu", enabled=False):
                x2d = x.reshape(-1, self.in_features)
                if x2d.shape[0] == 0:
                    return x.new_zeros(*shape[:-1], self.out_features, dtype=dtype)
                y = _int8_matmul().apply(x2d.contiguous(), self, dtype)
                if self.bias is not None:
                    y = y + self.bias.to(dtype)
            return y.reshape(*shape[:-1], self.out_features)

        def dequantized_weight(self):
            """The float weight this layer computes with (smoothing undone)."""
            return self.weight.float() * self.weight_scale[:, None] * self.inv_smooth[None, :]

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, int8 compute"

    return Int8Linear


Int8LinearClass = functools.cache(_module_class)


def make_int8_linear(weight, bias=None, act_absmax=None, alpha: float = 0.5, fuse: bool = True):
    """An Int8Linear from a float [N, K] ``weight``, smoothed by the calibration ``act_absmax`` [K] when given."""
    import torch

    weight = weight.float()
    if act_absmax is not None and alpha > 0:
        smooth = smoothing_factors(act_absmax.float(), weight.abs().amax(dim=0), alpha)
    else:
        smooth = torch.ones(weight.shape[1])
    q, scale = quantize_weight(weight, smooth)
    return Int8LinearClass()(q.contiguous(), scale, 1.0 / smooth, bias, fuse)


def smoothing_factors(act_absmax, weight_absmax, alpha: float):
    """SmoothQuant's s_j = max|x_j|^alpha / max|W_j|^(1 - alpha), 1 where a channel was never seen."""
    import torch

    act = act_absmax.clamp_min(1e-5)
    s = act.pow(alpha) / weight_absmax.clamp_min(1e-5).pow(1 - alpha)
    s = torch.where(act_absmax > 0, s, torch.ones_like(s))
    return s.clamp(1e-4, 1e4)


def dequantize_layer(layer):
    """The float weight of an Int8Linear, or None for any other layer (merge.base=dequantized)."""
    if type(layer).__name__ != "Int8Linear" or not hasattr(layer, "dequantized_weight"):
        return None
    return layer.dequantized_weight()


# ------------------------------------------------------------------ converting a loaded model
def base_linear_layers(model, skip_modules) -> list[tuple[object, str, str]]:
    """(parent, child name, full name) of every frozen base linear layer (4-bit or float), LoRA and skips excluded."""
    import torch

    found = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if (isinstance(child, torch.nn.Linear) and "lora_" not in full
                    and not any(full == s or full.endswith("." + s) or f".{s}." in full for s in skip_modules)):
                found.append((parent, child_name, full))
    return found


def calibrate(model, skip_modules, run_batches) -> dict[str, object]:
    """Per-input-channel max |x| of every base linear layer while ``run_batches()`` runs the model."""
    import torch

    absmax: dict[str, torch.Tensor] = {}
    hooks = []
    for parent, child_name, full in base_linear_layers(model, skip_modules):
        def record(module, args, name=full):
            x = args[0].detach()
            seen = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            absmax[name] = torch.maximum(absmax[name], seen) if name in absmax else seen
        hooks.append(getattr(parent, child_name).register_forward_pre_hook(record))
    try:
        run_batches()
    finally:
        for hook in hooks:
            hook.remove()
    return absmax


def convert(model, skip_modules, dense_weight, act_absmax: dict | None, alpha: float, fuse: bool) -> int:
    """Replace every base linear layer by an Int8Linear (its stored weight is freed as it goes); returns the count.

    ``dense_weight(layer)`` gives a layer's float weight (the quantization backend dequantizes its own).
    """
    from qlorax.engine.quant.common import return_freed_memory

    layers = base_linear_layers(model, skip_modules)
    for parent, child_name, full in layers:
        child = getattr(parent, child_name)
        weight = dense_weight(child)
        int8_layer = make_int8_linear(weight, child.bias, (act_absmax or {}).get(full), alpha, fuse)
        setattr(parent, child_name, int8_layer)
        del child, weight
    return_freed_memory()
    return len(layers)
