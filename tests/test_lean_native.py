"""The lean patches' native kernels (qlorax/engine/lean_native.py) against the torch ops they replace."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qlorax.engine import dropout as lora_dropout
from qlorax.engine import lean_native
from qlorax.engine.quant import int8

pytestmark = pytest.mark.skipif(lean_native.library() is None,
                                reason="no AVX-512 BF16 on this CPU (or the kernels did not build)")


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("rows,width", [(1, 16), (37, 64), (1024, 2048)])
def test_rmsnorm_forward_is_bit_identical_and_backward_close(rows, width):
    torch.manual_seed(rows)
    x = (torch.randn(rows, width) * 3).bfloat16()
    x[0, 1] = 200.0   # an outlier row
    w = torch.randn(width).bfloat16()
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.equal(lean_native.rmsnorm_apply(x, rstd, w), w * (xf * rstd).to(x.dtype))
    g = torch.randn(rows, width).bfloat16()
    xhat = xf * rstd
    gw = g.float() * w.float()
    want_dx = (rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))).to(x.dtype)
    want_dw = (g.float() * xhat.to(x.dtype).float()).sum(0)
    dx, dw = lean_native.rmsnorm_backward(g, x, rstd, w, True, True)
    assert _rel(dx, want_dx) < 5e-3 and _rel(dw, want_dw) < 1e-5
    only_dx, none = lean_native.rmsnorm_backward(g, x, rstd, w, True, False)
    assert torch.equal(only_dx, dx) and none is None
    again = lean_native.rmsnorm_backward(g, x, rstd, w, False, True)[1]
    assert torch.equal(again, dw)   # fixed-order partial sums: the same bits every time


@pytest.mark.parametrize("keep_int8", [False, True], ids=["bf16-kept", "int8-kept"])
@pytest.mark.parametrize("rows,width", [(3, 160), (512, 5632)])
def test_silu_mul_matches_torch(keep_int8, rows, width):
    torch.manual_seed(width)
    gate, up, grad = (torch.randn(rows, width) * 2).bfloat16(), torch.randn(rows, width).bfloat16(), \
        torch.randn(rows, width).bfloat16()
    hidden, kept = lean_native.silu_mul_forward(F.silu(gate), gate, up, keep_int8)
    assert torch.equal(hidden, F.silu(gate) * up)   # the forward is bit-identical
    if keep_int8:
        (gq, gs), (uq, us) = kept
        for (q, s), t in (((gq, gs), gate), ((uq, us), up)):
            ref_q, ref_s = int8.quantize_rows(t, torch.ones(width))
            assert torch.equal(s, ref_s) and int((q.int() - ref_q.int()).abs().max()) <= 1
        gate_seen, up_seen = (int8.dequantize_rows(q, s, torch.bfloat16) for q, s in kept)
        kept_gate, kept_up = kept
    else:
        assert kept is None
        gate_seen, up_seen, kept_gate, kept_up = gate, up, gate, up
    d_gate, d_up = lean_native.silu_mul_backward(grad, kept_gate, kept_up, True, True)
    assert _rel(d_up, grad * F.silu(gate_seen)) < 5e-3
    assert _rel(d_gate, torch.ops.aten.silu_backward(grad * up_seen, gate_seen)) < 5e-3
    again = lean_native.silu_mul_recompute(kept_gate, kept_up, rows, width)
    assert _rel(again, F.silu(gate_seen) * up_seen) < 5e-3
    if not keep_int8:
        assert torch.equal(again, hidden)   # silu from the native exp rounds to the same bf16 here


@pytest.mark.parametrize("shape", [(1, 16), (3, 37), (1024, 2048), (2, 5, 64)])
def test_hashed_dropout_is_bit_identical_to_the_reference(shape):
    x = torch.randn(shape).bfloat16()
    for seed in (0, 12345, 2 ** 32 - 1):
        seed = torch.tensor(seed, dtype=torch.int64)
        for p in (0.05, 0.5):
            want = lora_dropout.hashed_dropout(x, seed, lora_dropout.threshold(p), 1 / (1 - p))
            assert torch.equal(lean_native.hashed_dropout(x, seed, lora_dropout.threshold(p), 1 / (1 - p)), want)


def test_patched_modules_take_the_native_kernels_and_fall_back_with_the_same_forward(monkeypatch):
    """The lean RMSNorm and gated MLP give the same outputs with the native kernels and without them."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    from qlorax.engine import lean

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=160)
    norm, mlp = LlamaRMSNorm(64).to(torch.bfloat16), LlamaMLP(config).to(torch.bfloat16)
    norm.weight.data = torch.randn(64).bfloat16()
    norm.forward = lean._bind(lean._rmsnorm_forward, norm)
    mlp.forward = lean._bind(lean._gated_mlp_forward, mlp)
    mlp.qlorax_mlp_codec = int8.row_codec(False)
    x = torch.randn(4, 7, 64).bfloat16()
    g = torch.randn(4, 7, 64).bfloat16()
    runs = []
    calls = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(lean_native, "usable", lambda *t: False)
        else:
            real = lean_native.silu_mul_backward
            monkeypatch.setattr(lean_native, "silu_mul_backward", lambda *a: calls.append(1) or real(*a))
        xi = x.clone().requires_grad_()
        y = mlp(norm(xi))
        y.backward(g)
        runs.append((y.detach(), xi.grad))
    assert calls, "the native backward did not run"
    (y_native, dx_native), (y_torch, dx_torch) = runs
    assert torch.equal(y_native, y_torch)
    assert _rel(dx_native, dx_torch) < 2e-2


@pytest.mark.parametrize("batch,heads,kv_heads,length,dim,cos_batch", [(1, 32, 4, 256, 64, 1), (3, 8, 2, 33, 128, 3),
                                                                        (2, 4, 4, 7, 32, 1)])
def test_rotary_is_bit_identical_to_transformers_both_ways(batch, heads, kv_heads, length, dim, cos_batch, monkeypatch):
    """The native rotary against transformers' apply_rotary_pos_emb and autograd: q and k as the attention makes them
    (transposed views of [B, L, H, D]), GQA, cos and sin broadcast over the batch or not."""
    from transformers.models.llama import modeling_llama
    from transformers.models.llama.modeling_llama import LlamaAttention
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as current

    from qlorax.engine import lean

    original = getattr(current, "qlorax_original", current)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", original)   # put back after the test
    assert lean._native_rotary(LlamaAttention) == 1
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as replaced

    runs = []
    for function in (original, replaced):
        g = torch.Generator().manual_seed(length)
        q = (torch.randn(batch, length, heads, dim, generator=g) * 3).bfloat16().transpose(1, 2).requires_grad_()
        k = torch.randn(batch, length, kv_heads, dim, generator=g).bfloat16().transpose(1, 2).requires_grad_()
        cos, sin = (torch.randn(cos_batch, length, dim, generator=g).bfloat16() for _ in range(2))
        grads = (torch.randn(batch, heads, length, dim, generator=g).bfloat16(),
                 torch.randn(batch, kv_heads, length, dim, generator=g).bfloat16())
        q_embed, k_embed = function(q, k, cos, sin)
        torch.autograd.backward((q_embed, k_embed), grads)
        runs.append((q_embed, k_embed, q.grad, k.grad))
    assert replaced is not original
    for got, want in zip(*runs):
        assert torch.equal(got, want)
    fp32 = torch.randn(1, 2, 3, 64)   # what the kernel does not take goes to transformers' own
    cos = torch.randn(1, 3, 64)
    assert all(torch.equal(a, b) for a, b in zip(replaced(fp32, fp32, cos, cos), original(fp32, fp32, cos, cos)))


def test_a_rotary_the_probe_finds_different_is_left_and_probed_once(monkeypatch, caplog):
    """Where the probe disagrees with transformers' function, it stays in place: probed and warned about once for
    all the model's attention layers, not once per layer."""
    from transformers.models.llama import modeling_llama

    from qlorax.engine import lean

    current = modeling_llama.apply_rotary_pos_emb
    original = getattr(current, "qlorax_original", current)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", original)
    monkeypatch.setattr(lean, "_ROTARY_REFUSED", set())
    probes = []
    monkeypatch.setattr(lean, "_rotary_agrees", lambda *args: probes.append(args) or False)
    with caplog.at_level("WARNING", logger="qlorax"):
        assert [lean._native_rotary(modeling_llama.LlamaAttention) for _ in range(3)] == [0, 0, 0]
    assert modeling_llama.apply_rotary_pos_emb is original
    assert len(probes) == 1 and caplog.text.count("differs from the native rotary") == 1
