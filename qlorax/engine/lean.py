"""Memory-lean training kernels: the same forward values, fewer and smaller tensors kept for backward.

At batch 1, seq 256 on the TinyLlama-1.1B shape, autograd kept 546 MiB per step, and most of it
is avoidable (``train.lean_kernels=true``, the default, patches the model in place):

- LoRA dropout: peft casts the layer input to the adapter's fp32 dtype on the CPU (its autocast
  check looks at CUDA only), so every q/k/v adapter kept a 2 MB fp32 dropout mask and made a 2 MB
  fp32 copy. Under autocast the cast is switched off, and dropout keeps no mask at all: each element's
  keep bit is a hash of its index and one seed per call, recomputed in backward (``dropout``; 126 MiB ->
  nothing). The adapter path itself runs as one autograd node (``lora_fused``), which keeps its input
  rather than the dropped copy, so adapters on one input share it.
- RMSNorm: the fp32 upcast of the input was kept (88 MiB); now the input in its own dtype and one
  fp32 scale per row.
- Gated MLP ``down(silu(gate) * up)``: ``silu(gate)`` was kept besides ``gate`` and ``up``
  (60 MiB); now it is recomputed in backward. With LoRA on ``down_proj``, its adapter's kept input
  ``silu(gate) * up`` (another 60 MiB) is recomputed from them too. With int8 compute
  (``quant.int8_saved_mlp=int8``), ``gate`` and ``up`` themselves are kept as per-row int8: half their
  bytes (-253 MiB at batch 4), the forward unchanged, the backward seeing them rounded to int8 as the
  int8 matmuls see their own inputs.
- Loss: the fp32 logits of the whole batch (and, in backward, three more tensors of that size:
  about 130 MiB at batch 1, four times that at batch 4, and 4x more again for a 128K vocabulary)
  become chunks of at most 16 MiB: the head's input gradient is computed chunk by chunk during the
  forward, when each chunk's softmax is at hand, so nothing is recomputed.

Each patch applies only to module classes whose forward it reproduces exactly (checked by tests);
anything else keeps the model's own code. With bf16 activations, RMSNorm's and the gated MLP's elementwise work
(and the dropout hash) run as native one-pass loops (``lean_native``), the forwards still bit-identical, and so does
the rotary position embedding of q and k (both directions bit-identical; ``_native_rotary``). On CPUs with AMX-BF16,
attention's backward runs on tiles (``attention``; the forward stays transformers' SDPA). The adapters on q/k/v and
gate/up keep the RMSNorm's recipe rather than its output (``NormOutput``).
"""
from __future__ import annotations

import functools
import logging

from qlorax.engine import dropout as lora_dropout
from qlorax.engine import attention, lean_native, lora_fused

log = logging.getLogger("qlorax")
RMSNORM_CLASSES = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
GATED_MLP_CLASSES = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
PLAIN_HEAD_CLASSES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
ROTARY_ATTENTION_CLASSES = {"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention"}
_ROTARY_REFUSED: set[str] = set()   # modules whose apply_rotary_pos_emb the probe found different: not probed again
HEAD_CHUNK_ELEMENTS = 2 ** 22   # fp32 logits per chunk: 16 MiB (8 MiB: 4 chunks at 256 tokens, the head 25% slower)


def make_lean(model, autocast: bool, mlp_codec=None) -> dict[str, int]:
    """Patch ``model`` (a peft model) for training; returns how many modules of each kind were patched.

    ``mlp_codec``: (quantize, dequantize) from ``int8.row_codec`` to keep the gated MLP's gate and up as int8 rows,
    or None.
    """
    import torch

    counts = {"rmsnorm": 0, "gated_mlp": 0, "lora_dropout": 0, "fused_lora": 0, "chunked_loss": 0,
              "attention": int(attention.enable(model)), "rotary": 0}
    for module in model.modules():
        name = type(module).__name__
        if name in RMSNORM_CLASSES and hasattr(module, "variance_epsilon"):
            module.forward = _bind(_rmsnorm_forward, module)
            counts["rmsnorm"] += 1
        elif name in ROTARY_ATTENTION_CLASSES:
            counts["rotary"] += _native_rotary(type(module))
        elif name in GATED_MLP_CLASSES and _is_silu(getattr(module, "act_fn", None)):
            module.forward = _bind(_gated_mlp_forward, module)
            module.qlorax_mlp_codec = mlp_codec
            counts["gated_mlp"] += 1
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            if autocast:
                module.cast_input_dtype_enabled = False   # autocast already runs the adapter in bf16
            for key, dropout in list(dropouts.items()):
                if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                    dropouts[key] = seeded_dropout(dropout.p)
                    counts["lora_dropout"] += 1
            counts["fused_lora"] += lora_fused.fuse(module)
    causal_lm = _causal_lm(model)
    if type(causal_lm).__name__ in PLAIN_HEAD_CLASSES:
        causal_lm.qlorax_chunked_loss = True
        counts["chunked_loss"] = 1
    log.info("lean kernels: %d RMSNorm, %d gated MLP, %d LoRA dropout module(s), %d fused LoRA path(s), chunked loss: "
             "%s, attention backward on AMX tiles: %s, native rotary: %s", counts["rmsnorm"], counts["gated_mlp"],
             counts["lora_dropout"], counts["fused_lora"], "yes" if counts["chunked_loss"] else "no",
             "yes" if counts["attention"] else "no", "yes" if counts["rotary"] else "no")
    return counts


def _causal_lm(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _bind(function, module):
    import types

    return types.MethodType(function, module)


def _is_silu(act) -> bool:
    import torch

    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


# ------------------------------------------------------------------ RMSNorm
def _rmsnorm_forward(self, hidden_states):
    import torch

    return _rmsnorm_class().apply(hidden_states, self.weight, self.variance_epsilon, torch.is_grad_enabled())


@functools.cache   # made on first use, so importing this module needs no torch
def _rmsnorm_class():
    import torch

    class RMSNorm(torch.autograd.Function):
        """weight * (x * rsqrt(mean(x^2) + eps)) as transformers' Llama computes it; keeps x and rstd.

        Where ``lean_native`` takes bf16 x and weight, the row scale still comes from torch's reduction (so the
        output stays bit-identical) and the rest of the forward, and the backward, run natively.
        """

        @staticmethod
        def forward(ctx, x, weight, eps, grad_enabled=False):
            xf = x.float()
            rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            ctx.save_for_backward(x, weight, rstd)
            out = _rmsnorm_output(x, rstd, weight)
            if grad_enabled and any(ctx.needs_input_grad[:2]):   # consumers may keep this recipe, not ``out``
                out.qlorax_recompute = NormOutput(x, rstd, weight)
            return out

        @staticmethod
        def backward(ctx, grad):
            x, weight, rstd = ctx.saved_tensors
            want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            if lean_native.usable(grad, x, weight):
                grad_x, grad_weight = lean_native.rmsnorm_backward(grad, x, rstd, weight, want_dx, want_dw)
                return grad_x, None if grad_weight is None else grad_weight.to(weight.dtype), None, None
            xhat = x.float() * rstd
            grad_weight = None
            if want_dw:
                dims = tuple(range(grad.dim() - 1))
                grad_weight = (grad.float() * xhat.to(x.dtype).float()).sum(dims).to(weight.dtype)
            grad_x = None
            if want_dx:
                g = grad.float() * weight.float()
                grad_x = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
            return grad_x, grad_weight, None, None

    return RMSNorm


def _rmsnorm_output(x, rstd, weight):
    """weight * (x * rstd) in x's dtype: the forward's output, and bit for bit the same again from ``NormOutput``."""
    if lean_native.usable(x, weight):
        return lean_native.rmsnorm_apply(x, rstd, weight)
    return weight * (x.float() * rstd).to(x.dtype)


class NormOutput:
    """An RMSNorm's output as its kept input and row scales give it again (``qlorax_recompute`` on the output).

    The LoRA adapters on q/k/v and on gate/up keep their input for A's gradient: the norm's output, 4 MiB per
    layer and kind at batch 4 on the 1.1B shape (176 MiB all-linear) that the norm's own backward does not need,
    since it keeps its input. A consumer (``lora_fused``) calls ``adopt``: it saves the returned tensors (x, rstd)
    with ``save_for_backward`` like its own (so saved-tensor hooks, gradient checkpointing's among them, see them)
    and in backward gets the output again from ``_NormRebuild.output`` with them: computed once for all the
    adopters, held until the last of them has it, then dropped.
    """
    __slots__ = ("x", "rstd", "rebuild")

    def __init__(self, x, rstd, weight):
        self.x, self.rstd, self.rebuild = x, rstd, _NormRebuild(weight)

    def adopt(self):
        """(tensors to save, the object whose ``output(*saved)`` gives the output in backward)."""
        self.rebuild.users += 1
        return (self.x, self.rstd), self.rebuild


class _NormRebuild:
    """What an adopter of a ``NormOutput`` keeps besides its saved tensors: the norm's weight and the shared copy."""
    __slots__ = ("weight", "cached", "users")

    def __init__(self, weight):
        self.weight, self.cached, self.users = weight, None, 0

    def output(self, x, rstd):
        out = self.cached if self.cached is not None else _rmsnorm_output(x, rstd, self.weight)
        self.users -= 1
        self.cached = out if self.users > 0 else None   # the last adopter's backward drops it
        return out


# ------------------------------------------------------------------ rotary position embedding
def _native_rotary(attention_class) -> int:
    """Route the ``apply_rotary_pos_emb`` that ``attention_class``'s module calls through ``rotary``: 1 where it
    now does (it did already, or it was replaced now), else 0.

    The function is module-level in transformers (the attention's forward looks it up there), so it is replaced in
    that module, for every model of the family in this process. That is safe because the replacement is
    bit-identical in both directions: it is checked against the original on a probe first, and anything the
    native kernel does not take (other dtypes, layouts, a cos or sin that wants a gradient) goes to the original.
    """
    import sys

    module = sys.modules.get(attention_class.__module__)
    original = getattr(module, "apply_rotary_pos_emb", None)
    if original is None or module.__name__ in _ROTARY_REFUSED or not lean_native.usable():
        return 0
    if getattr(original, "qlorax_original", None) is not None:
        return 1
    replacement = functools.partial(_rotary_forward, original=original)
    replacement.qlorax_original = original
    if not _rotary_agrees(original, replacement):   # once per module, not once per layer
        _ROTARY_REFUSED.add(module.__name__)
        log.warning("lean kernels: %s.apply_rotary_pos_emb differs from the native rotary; left as it is",
                    module.__name__)
        return 0
    module.apply_rotary_pos_emb = replacement
    return 1


def _rotary_forward(q, k, cos, sin, *args, original, **kwargs):
    if (not args and kwargs.get("position_ids") is None and kwargs.get("unsqueeze_dim", 1) == 1
            and not (cos.requires_grad or sin.requires_grad)
            and lean_native.rotary_usable(q, cos, sin) and lean_native.rotary_usable(k, cos, sin)):
        return _rotary_class().apply(q, k, cos, sin)
    return original(q, k, cos, sin, *args, **kwargs)


def _rotary_agrees(original, replacement) -> bool:
    """The replacement's values and input gradients equal the original's on a probe (GQA shapes, q strided)."""
    import torch

    runs = []
    for function in (original, replacement):
        generator = torch.Generator().manual_seed(0)
        q = torch.randn(2, 5, 4, 64, generator=generator).bfloat16().transpose(1, 2).requires_grad_()
        k = torch.randn(2, 2, 5, 64, generator=generator).bfloat16().requires_grad_()
        cos, sin = (torch.randn(1, 5, 64, generator=generator).bfloat16() for _ in range(2))
        qe, ke = function(q, k, cos, sin)
        (qe.float().sum() * 3 + (ke.float() ** 2).sum()).backward()
        runs.append((qe, ke, q.grad, k.grad))
    return all(torch.equal(a, b) for a, b in zip(*runs))


@functools.cache   # made on first use, so importing this module needs no torch
def _rotary_class():
    import torch

    class Rotary(torch.autograd.Function):
        """(q, k) rotated by cos and sin as transformers' ``apply_rotary_pos_emb``; keeps cos and sin only."""

        @staticmethod
        def forward(ctx, q, k, cos, sin):
            ctx.save_for_backward(cos, sin)
            return lean_native.rotary(q, cos, sin, False), lean_native.rotary(k, cos, sin, False)

        @staticmethod
        def backward(ctx, grad_q, grad_k):
            cos, sin = ctx.saved_tensors
            return (*(None if g is None else _rotary_backward(g, cos, sin) for g in (grad_q, grad_k)), None, None)

    return Rotary


def _rotary_backward(grad, cos, sin):
    """The input gradient of the rotation for ``grad`` (natively where it can, else as autograd computes it)."""
    import torch

    if lean_native.rotary_usable(grad, cos, sin):
        return lean_native.rotary(grad, cos, sin, True)
    cos, sin, half = cos.unsqueeze(1), sin.unsqueeze(1), grad.shape[-1] // 2
    rotated = grad * sin
    return grad * cos + torch.cat((rotated[..., half:], -rotated[..., :half]), dim=-1)


# ------------------------------------------------------------------ gated MLP
def _gated_mlp_forward(self, x):
    import torch

    gate, up = self.gate_proj(x), self.up_proj(x)
    codec = getattr(self, "qlorax_mlp_codec", None)
    plain = not (gate.requires_grad or up.requires_grad) or _other_saved_tensor_hooks()
    kept = _KeptGateUp(gate, up, None if plain else codec)
    hidden = _silu_mul_class().apply(gate, up, kept)
    del gate, up   # with int8 kept, nothing of theirs outlives the forward
    if plain:
        return self.down_proj(hidden)
    # A LoRA adapter on down_proj keeps its input (silu(gate) * up, [tokens, intermediate]) for its A gradient;
    # gate and up are kept anyway, so backward recomputes it from them instead (-253 MiB at batch 4 on the
    # 1.1B shape, one silu and multiply per layer in backward).
    with torch.autograd.graph.saved_tensors_hooks(*_recompute_from(hidden, kept)):
        return self.down_proj(hidden)


def _other_saved_tensor_hooks() -> bool:
    """Saved-tensor hooks already active (non-reentrant gradient checkpointing): theirs must see every tensor."""
    import torch

    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


class _KeptGateUp:
    """The gated MLP's gate and up as backward gets them: the tensors themselves, or per-row int8 and scales.

    Int8 rows (``codec``, int8 compute only) halve what the MLP keeps per token (2 x intermediate bytes instead
    of 4); the forward is computed from the exact tensors before they are dropped. ``native``: ``lean_native``
    runs the forward's product and quantization and the backward (bf16 gate and up, width a multiple of 16).
    """
    __slots__ = ("gate", "up", "shape", "dtype", "codec", "native")

    def __init__(self, gate, up, codec):
        self.shape, self.dtype, self.codec = gate.shape, gate.dtype, codec
        self.native = lean_native.usable(gate, up)
        self.gate = self.up = None

    def keep(self, gate, up, int8_rows=None):
        """Keep gate and up: as they are, or as int8 rows (``int8_rows``: already quantized, else the codec's)."""
        if self.codec is None:
            self.gate, self.up = gate, up
        elif int8_rows is not None:
            self.gate, self.up = int8_rows
        else:
            quantize, _ = self.codec
            width = gate.shape[-1]
            self.gate = quantize(gate.detach().reshape(-1, width))
            self.up = quantize(up.detach().reshape(-1, width))

    def tensors(self):
        """(gate, up) in the forward's dtype and shape."""
        if self.codec is None:
            return self.gate, self.up
        dequantize = self.codec[1]
        return tuple(dequantize(q, scale, self.dtype).reshape(self.shape) for q, scale in (self.gate, self.up))

    def hidden(self):
        """silu(gate) * up again, from what is kept."""
        import torch

        if self.native:
            return lean_native.silu_mul_recompute(self.gate, self.up, self.shape.numel() // self.shape[-1],
                                                  self.shape[-1]).reshape(self.shape)
        gate, up = self.tensors()
        return torch.nn.functional.silu(gate) * up


def _recompute_from(hidden, kept: _KeptGateUp):
    """Saved-tensor hooks that keep ``kept`` (gate and up) in place of any saved view of ``hidden``."""
    where = (hidden.untyped_storage().data_ptr(), hidden.storage_offset(), hidden.numel(), hidden.dtype)

    def pack(t):
        if (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype) == where and t.is_contiguous():
            return _Recompute(kept, t.shape)
        return t

    def unpack(saved):
        if isinstance(saved, _Recompute):
            return saved.kept.hidden().reshape(saved.shape)
        return saved

    return pack, unpack


class _Recompute:
    __slots__ = ("kept", "shape")

    def __init__(self, kept, shape):
        self.kept, self.shape = kept, shape


@functools.cache   # made on first use, so importing this module needs no torch
def _silu_mul_class():
    import torch

    class SiluMul(torch.autograd.Function):
        """silu(gate) * up, keeping gate and up only (``kept``: as they are, or int8 rows; silu is recomputed)."""

        @staticmethod
        def forward(ctx, gate, up, kept):
            silu = torch.nn.functional.silu(gate)
            if kept.native:   # the product (bit-identical: torch's silu) and any int8 rows in one pass
                hidden, int8_rows = lean_native.silu_mul_forward(silu, gate, up, kept.codec is not None)
            else:
                hidden, int8_rows = silu * up, None
            kept.keep(gate, up, int8_rows)
            ctx.kept = kept if kept.codec is not None else None
            if ctx.kept is None:
                ctx.save_for_backward(gate, up)
            ctx.native = kept.native
            return hidden

        @staticmethod
        def backward(ctx, grad):
            want_gate, want_up = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            if ctx.native and lean_native.usable(grad):
                gate, up = ctx.saved_tensors if ctx.kept is None else (ctx.kept.gate, ctx.kept.up)
                shape = grad.shape
                grad_gate, grad_up = lean_native.silu_mul_backward(grad, gate, up, want_gate, want_up)
                return (None if grad_gate is None else grad_gate.reshape(shape),
                        None if grad_up is None else grad_up.reshape(shape), None)
            gate, up = ctx.saved_tensors if ctx.kept is None else ctx.kept.tensors()
            grad_gate = grad_up = None
            if want_up:
                grad_up = grad * torch.nn.functional.silu(gate)
            if want_gate:
                grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
            return grad_gate, grad_up, None

    return SiluMul


# ------------------------------------------------------------------ LoRA dropout
@functools.cache   # made on first use, so importing this module needs no torch
def _dropout_class():
    import torch

    class Dropout(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, p):
            dropped, token = lora_dropout.drop(x, p)
            ctx.save_for_backward(token)
            ctx.p = p
            return dropped

        @staticmethod
        def backward(ctx, grad):
            (token,) = ctx.saved_tensors
            return lora_dropout.reapply(grad, token, ctx.p), None

    return Dropout


@functools.cache   # made on first use, so importing this module needs no torch
def _seeded_dropout_class():
    import torch

    class SeededDropout(torch.nn.Dropout):
        """nn.Dropout that keeps only a seed for backward (``dropout``), not a mask in the input's dtype."""

        def forward(self, x):
            if not self.training or self.p == 0:
                return x
            return _dropout_class().apply(x, self.p)

    return SeededDropout


# ------------------------------------------------------------------ chunked loss
def chunked_head(model):
    """(decoder, head) when ``model`` was patched for the chunked loss and its head is a plain frozen Linear."""
    import torch

    causal_lm = _causal_lm(model)
    if not getattr(causal_lm, "qlorax_chunked_loss", False):
        return None
    head = causal_lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.weight.requires_grad or head.bias is not None:
        return None   # a LoRA-adapted, quantized or trained head: the model's own forward
    return causal_lm.get_decoder(), head


def head_loss_sum(hidden, weight, labels, ignore_index: int):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``labels`` ([N, H], [V, H], [N]), in chunks."""
    return _head_loss_class().apply(hidden, weight, labels, ignore_index)


@functools.cache   # made on first use, so importing this module needs no torch
def _head_loss_class():
    import torch

    class HeadLoss(torch.autograd.Function):
        """Forward computes each chunk's loss and, when needed, its input gradient; backward only scales it."""

        @staticmethod
        def forward(ctx, hidden, weight, labels, ignore_index):
            rows = max(1, HEAD_CHUNK_ELEMENTS // weight.shape[0])
            want_grad = ctx.needs_input_grad[0]
            grad_hidden = torch.empty_like(hidden) if want_grad else None
            total = torch.zeros((), dtype=torch.float32)
            for start in range(0, hidden.shape[0], rows):
                h, y = hidden[start:start + rows], labels[start:start + rows]
                logp = torch.log_softmax(torch.nn.functional.linear(h, weight).float(), dim=-1)
                valid = y != ignore_index
                target = torch.where(valid, y, 0).unsqueeze(1)
                picked = logp.gather(1, target).squeeze(1)
                total -= torch.where(valid, picked, 0).sum()
                if want_grad:
                    grad = logp.exp_()                          # softmax, in place
                    grad.scatter_add_(1, target, torch.full_like(picked, -1.0).unsqueeze(1))
                    grad.mul_(valid.unsqueeze(1))
                    grad_hidden[start:start + rows] = grad.to(weight.dtype) @ weight
            ctx.save_for_backward(grad_hidden)
            return total

        @staticmethod
        def backward(ctx, grad):
            (grad_hidden,) = ctx.saved_tensors
            return grad_hidden * grad.to(grad_hidden.dtype), None, None, None

    return HeadLoss


def seeded_dropout(p: float):
    """nn.Dropout(p) that keeps only a seed for backward (a 1-byte mask where torch.compile is unavailable)."""
    return _seeded_dropout_class()(p)
