"""The AMX int8 tile kernels (qlorax/engine/quant/amx.py) against torch: skipped on CPUs without AMX-INT8."""
from __future__ import annotations

import pytest
import torch

from qlorax.engine.quant import amx, int8

pytestmark = pytest.mark.skipif(amx.library() is None, reason="no AMX-INT8 on this CPU (or the kernels did not build)")
# rows M, outputs N, inputs K: 1100 x 2048 rows of x go in two chunks (``chunk_rows``); 192 inputs on 2 threads start
# the second thread's strip off a 64-column boundary; 256 and 5632 outputs take 256- and 128-column strips
SHAPES = [(1, 64, 64), (37, 320, 192), (300, 256, 2048), (64, 5632, 128), (1100, 64, 2048)]


def _plain(q, rows, cols, vnni):
    """The [rows, cols] int8 matrix in a quantizer output of either layout."""
    padded = -(-rows // 16) * 16
    if vnni:   # [M/16][K/4][16][4] -> [M, K]
        q = q.view(padded // 16, cols // 4, 16, 4).permute(0, 2, 1, 3).reshape(padded, cols)
    return q.view(padded, cols)[:rows]


@pytest.mark.parametrize("vnni", [False, True], ids=["plain", "vnni"])
@pytest.mark.parametrize("rows,cols", [(1, 64), (37, 192), (300, 2048)])
def test_quantizer_matches_the_torch_reference(rows, cols, vnni):
    torch.manual_seed(rows)
    x = torch.randn(rows, cols, dtype=torch.bfloat16)
    x[0, 3] = 60.0   # an outlier sets row 0's scale
    col_scale = torch.rand(cols) + 0.5
    q, scale = amx.quantize_rows(x, col_scale, vnni)
    ref_q, ref_scale = int8.quantize_rows(x, col_scale)
    assert torch.equal(scale, ref_scale)
    got = _plain(q, rows, cols, vnni)
    differ = got.int() != ref_q.int()
    assert (got.int() - ref_q.int()).abs().max() <= 1   # a half may round the other way, by one
    assert differ.float().mean() < 1e-4
    padded = -(-rows // 16) * 16
    assert not _plain(q, padded, cols, vnni)[rows:].any()   # padding rows are zero


@pytest.mark.parametrize("rows,outs,cols", SHAPES)
def test_forward_and_input_gradient_equal_exact_integer_products(rows, outs, cols):
    """Given the same int8 operands, the tile products are exact: equal to float64 products, scaled alike."""
    torch.manual_seed(outs)
    weight = torch.randint(-127, 128, (outs, cols), dtype=torch.int8)
    weight_scale, inv_smooth = torch.rand(outs) * 0.01, torch.rand(cols) + 0.5
    x = torch.randn(rows, cols, dtype=torch.bfloat16)
    q, row_scale = amx.quantize_rows(x, inv_smooth, vnni=True)
    exact = _plain(q, rows, cols, True).double() @ weight.double().t()
    want = ((exact.float() * row_scale) * weight_scale).to(torch.bfloat16)
    assert torch.equal(amx.forward(x, weight, inv_smooth, weight_scale), want)

    grad = torch.randn(rows, outs, dtype=torch.bfloat16)
    gq, grad_scale = amx.quantize_rows(grad, weight_scale, vnni=False)
    exact = _plain(gq, rows, outs, False).double() @ weight.double()
    want = ((exact.float() * grad_scale) * inv_smooth).to(torch.bfloat16)
    assert torch.equal(amx.backward(grad, weight, weight_scale, inv_smooth), want)


@pytest.mark.parametrize("storage", ["int8", "int4"])
def test_int8_linear_runs_the_tile_kernels_and_agrees_with_int_mm(storage, monkeypatch):
    calls = []
    real_forward, real_backward = amx.forward, amx.backward
    monkeypatch.setattr(amx, "forward", lambda *a: calls.append("forward") or real_forward(*a))
    monkeypatch.setattr(amx, "backward", lambda *a: calls.append("backward") or real_backward(*a))
    torch.manual_seed(0)
    weight = torch.randn(320, 256) * 0.02
    tiles = int8.make_int8_linear(weight, storage=storage)
    reference = int8.make_int8_linear(weight, storage=storage, matmul="torch")
    outs = []
    for layer in (tiles, reference):
        x = torch.randn(50, 256, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = layer(x)
        y.backward(torch.ones_like(y))
        outs.append((y.float(), x.grad.float()))
    assert calls == ["forward", "backward"]   # the reference layer never reached them
    for got, want in zip(*outs):   # the quantizers may round a half differently: one bf16 step at most
        assert (got - want).abs().max() <= want.abs().max() * 2 ** -7


def test_chunks_and_strips_are_sized_to_l2():
    assert amx.chunk_rows(256, 5632) == 256 and amx.unpacks_inside(256, 5632)   # 1.4 MiB: one chunk
    assert amx.chunk_rows(1024, 2048) == 512 and not amx.unpacks_inside(1024, 2048)
    assert amx.chunk_rows(1100, 2048) == 576   # two even chunks, not 736 + 368
    assert amx.chunk_rows(1, 64) == 32
    assert amx.strip_columns(2048) == 256 and amx.strip_columns(5632) == 128


def test_the_tile_path_builds_no_compiled_kernels(monkeypatch):
    """With the tile kernels (and the native unpack), torch.compile's quantizers are never built: not by making the
    MLP's int8 rows codec (the native MLP kernels do its work), not for an int4 weight's whole unpack (rows of x in
    more than one chunk)."""
    monkeypatch.setattr(int8, "_fused", lambda: pytest.fail("torch.compile'd quantizers were built"))
    int8.row_codec(True)
    layer = int8.make_int8_linear(torch.randn(320, 256) * 0.02, storage="int4")
    x = torch.randn(6200, 256, dtype=torch.bfloat16, requires_grad=True)
    assert not amx.unpacks_inside(*x.shape)
    layer(x).sum().backward()
    assert x.grad.abs().max() > 0


def test_layers_the_tiles_cannot_take_fall_back_to_int_mm(monkeypatch):
    monkeypatch.setattr(amx, "forward", lambda *a: pytest.fail("K = 96 is not a multiple of 64"))
    layer = int8.make_int8_linear(torch.randn(64, 96) * 0.02)
    x = torch.randn(20, 96, dtype=torch.bfloat16)
    assert layer(x).shape == (20, 64)
    assert not amx.usable(96, 64, x) and amx.usable(128, 64, x) and not amx.usable(128, 64, x.float())



@pytest.mark.parametrize("rows,outs,cols", SHAPES)
def test_int4_stored_weights_unpack_inside_both_kernels_exactly(rows, outs, cols):
    """An int4-stored weight (unpacked inside the kernels: 64 or, at unaligned strip edges, 16 values at a time into
    the input gradient's strips, 32 rows at a time into the forward's panels) gives the products of its int8 form."""
    torch.manual_seed(cols)
    packed, mult, unit = int8.pack_int4(torch.randn(outs, cols))
    weight = int8.unpack_int4(packed, mult)
    inv_smooth = torch.rand(cols) + 0.5
    grad = torch.randn(rows, outs, dtype=torch.bfloat16)
    assert torch.equal(amx.backward(grad, packed, unit, inv_smooth, mult), amx.backward(grad, weight, unit, inv_smooth))
    x = torch.randn(rows, cols, dtype=torch.bfloat16)   # the forward too, its panels unpacked inside
    assert torch.equal(amx.forward(x, packed, inv_smooth, unit, mult), amx.forward(x, weight, inv_smooth, unit))
