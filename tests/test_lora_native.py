"""The LoRA path's native kernels (qlorax/engine/lora_native.py) against fp32 autograd with the same dropout mask."""
from __future__ import annotations

import pytest
import torch

from qlorax.engine import dropout as lora_dropout
from qlorax.engine import lora_fused, lora_native

needs_kernels = pytest.mark.skipif(lora_native.library() is None,
                                   reason="no AVX-512 BF16 on this CPU (or the kernels did not build)")


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _case(rows, cols, outs, rank, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(rows, cols).bfloat16()
    base = torch.randn(rows, outs).bfloat16()
    a, b = torch.randn(rank, cols) * 0.1, torch.randn(outs, rank) * 0.1
    return x, base, a, b, torch.randn(rows, outs).bfloat16()


def _reference(x, base, a, b, grad, scaling, seed, p):
    """fp32 autograd of base + scaling * (dropout(x) @ A.T) @ B.T, the mask ``dropout.drop`` draws for ``seed``."""
    xr, ar, br = (t.detach().clone().float().requires_grad_() for t in (x, a.bfloat16(), b.bfloat16()))
    keep = lora_dropout.hashed_dropout(torch.ones_like(x), torch.tensor(seed), lora_dropout.threshold(p), 1.0) != 0
    kept = torch.where(keep, xr / (1 - p), 0)
    out = base.float() + (kept @ ar.t()) * scaling @ br.t()
    out.backward(grad.float())
    return out, xr.grad, ar.grad, br.grad, keep


@needs_kernels
# ranks 4, 8, 16 and 32 take the backward compiled for them; 12 the general one
@pytest.mark.parametrize("rows,cols,outs,rank,p", [(37, 64, 96, 4, 0.0), (37, 64, 96, 4, 0.3), (300, 2048, 256, 8, 0.05),
                                                   (100, 256, 2048, 16, 0.1), (50, 128, 64, 12, 0.1),
                                                   (20, 64, 96, 32, 0.2)])
def test_forward_and_backward_match_fp32_autograd_with_the_same_mask(rows, cols, outs, rank, p):
    x, base, a, b, grad = _case(rows, cols, outs, rank)
    seed, threshold, drop_scale = 1234, lora_dropout.threshold(p), 1 / (1 - p)
    adapter = lora_native.weights(a, b)
    out, middle = lora_native.forward(x, base, adapter, 2.0, seed, threshold, drop_scale)
    want_out, want_x, want_a, want_b, keep = _reference(x, base, a, b, grad, 2.0, seed, p)
    grad_x, grad_a, grad_b = lora_native.backward(grad, x, middle, adapter, 2.0, seed, threshold, drop_scale,
                                                  True, True, True)
    assert out.dtype == grad_x.dtype == torch.bfloat16 and grad_a.dtype == grad_b.dtype == torch.float32
    assert grad_a.shape == a.shape and grad_b.shape == b.shape and grad_x.shape == x.shape
    assert _rel(out, want_out) < 5e-3 and _rel(grad_x, want_x) < 5e-3
    assert _rel(grad_a, want_a) < 5e-3 and _rel(grad_b, want_b) < 5e-3
    assert not grad_x[~keep].any()   # dropped elements get no gradient
    again = lora_native.backward(grad, x, middle, adapter, 2.0, seed, threshold, drop_scale, False, True, True)
    assert again[0] is None and torch.equal(again[1], grad_a) and torch.equal(again[2], grad_b)   # fixed-order sums


@needs_kernels
def test_a_strided_input_is_read_as_its_rows():
    x, base, a, b, grad = _case(24, 64, 96, 4)
    wide = torch.zeros(24, 128, dtype=torch.bfloat16)
    wide[:, :64] = x
    strided = wide[:, :64]   # rows 128 apart
    threshold, drop_scale = lora_dropout.threshold(0.2), 1 / 0.8
    adapter = lora_native.weights(a, b)
    out, middle = lora_native.forward(strided, base, adapter, 2.0, 9, threshold, drop_scale)
    want_out, want_x, want_a, want_b, _ = _reference(x, base, a, b, grad, 2.0, 9, 0.2)
    grad_x, grad_a, grad_b = lora_native.backward(grad, strided, middle, adapter, 2.0, 9, threshold, drop_scale,
                                                  True, True, True)
    assert _rel(out, want_out) < 5e-3 and _rel(grad_x, want_x) < 5e-3
    assert _rel(grad_a, want_a) < 5e-3 and _rel(grad_b, want_b) < 5e-3


@needs_kernels
def test_the_fused_path_runs_them_and_agrees_with_its_torch_ops(monkeypatch):
    x, base, a, b, grad = _case(40, 128, 64, 8)
    ran = []
    for name in ("forward", "backward"):
        real = getattr(lora_native, name)
        monkeypatch.setattr(lora_native, name, lambda *args, real=real, name=name: ran.append(name) or real(*args))
    results = []
    for native in (True, False):
        if not native:
            assert ran == ["forward", "backward"]
            monkeypatch.setattr(lora_native, "usable", lambda *args: False)
        xs, as_, bs = (t.clone().requires_grad_() for t in (x, a, b))
        torch.manual_seed(5)   # the same dropout seed for both
        out = lora_fused._function().apply(xs, base, as_, bs, 2.0, 0.2)
        out.backward(grad)
        results.append((out, xs.grad, as_.grad, bs.grad))
    assert ran == ["forward", "backward"]   # the torch ops ran the second time
    for got, want in zip(*results):
        assert _rel(got, want) < 1e-2


def test_shapes_the_kernels_cannot_take_use_torch_ops():
    x, base = torch.zeros(4, 64, dtype=torch.bfloat16), torch.zeros(4, 96, dtype=torch.bfloat16)
    assert lora_native.usable(x, base, 8) == (lora_native.library() is not None)
    assert not lora_native.usable(x.float(), base, 8)
    assert not lora_native.usable(torch.zeros(4, 48, dtype=torch.bfloat16), base, 8)   # width not a multiple of 32
    assert not lora_native.usable(x, torch.zeros(4, 80, dtype=torch.bfloat16), 8)
    assert not lora_native.usable(x, base, lora_native.MAX_RANK + 1)
