"""The AMX-BF16 tile kernels of 4-bit weights (qlorax/engine/quant/amx_4bit.py) against dequantize-then-matmul:
skipped on CPUs without AMX-BF16."""
from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes import functional as F  # noqa: E402

from conftest import linear4bit  # noqa: E402
from qlorax.engine.quant import amx_4bit, bnb_cpu  # noqa: E402

pytestmark = pytest.mark.skipif(amx_4bit.library() is None,
                                reason="no AMX-BF16 on this CPU (or the kernels did not build)")
# rows M, outputs N, inputs K, format, block size, double quantization: 21 and 37 rows pad to 32 and 48 (a partial
# 16-row block); 800 rows of 2048 inputs go in 3 chunks (``amx.chunk_rows``); 2048 and 5632 outputs take several row
# blocks (``blocking``) for 64 and 300 rows, their sums kept across blocks; 96 outputs are 3 panels on 2 threads
SHAPES = [(21, 64, 64, "nf4", 64, False), (37, 96, 192, "fp4", 64, True), (800, 160, 2048, "nf4", 128, False),
          (64, 2048, 512, "nf4", 64, True), (300, 5632, 128, "fp4", 64, False)]

@pytest.fixture(params=[1, 3], ids=["1-thread", "3-threads"])
def threads(request):
    """Panels and strips split over torch's threads: 1 and 3 (this machine's default is its core count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)

def _quantized(outs, cols, quant_type, blocksize, nested, seed=0):
    torch.manual_seed(seed)
    weight = torch.randn(outs, cols, dtype=torch.bfloat16) * 0.05
    packed, state = F.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested,
                                    quant_storage=torch.uint8)
    return packed, state, F.dequantize_4bit(packed, state).to(torch.bfloat16)

@pytest.mark.parametrize("rows,outs,cols,quant_type,blocksize,nested", SHAPES)
def test_kernels_decode_exactly_the_dequantized_weight(rows, outs, cols, quant_type, blocksize, nested, threads):
    """Times rows of an identity, each output is one product: the decoded weight equals bitsandbytes' dequantization,
    bit for bit, in both kernels (forward reads W's rows, the input gradient its columns), for all of W and for
    ``rows`` picked rows (partial 16-row blocks, and the input gradient's sums kept across W's row blocks)."""
    packed, state, dense = _quantized(outs, cols, quant_type, blocksize, nested)
    assert amx_4bit.usable(state, dense)
    absmax = bnb_cpu._absmax(state)
    assert torch.equal(amx_4bit.forward(torch.eye(cols, dtype=torch.bfloat16), packed, absmax, state).t(), dense)
    assert torch.equal(amx_4bit.backward(torch.eye(outs, dtype=torch.bfloat16), packed, absmax, state), dense)
    pick = torch.arange(rows) * 7 % cols
    got = amx_4bit.forward(torch.eye(cols, dtype=torch.bfloat16)[pick], packed, absmax, state)
    assert torch.equal(got, dense[:, pick].t())
    pick = torch.arange(rows) * 5 % outs
    got = amx_4bit.backward(torch.eye(outs, dtype=torch.bfloat16)[pick], packed, absmax, state)
    assert torch.equal(got, dense[pick])

@pytest.mark.parametrize("rows,outs,cols,quant_type,blocksize,nested", SHAPES)
def test_forward_and_input_gradient_agree_with_float64_products(rows, outs, cols, quant_type, blocksize, nested,
                                                                threads):
    """fp32 sums of exact bf16 products: within bf16 rounding of the float64 product of the dequantized weight."""
    packed, state, dense = _quantized(outs, cols, quant_type, blocksize, nested, seed=rows)
    absmax = bnb_cpu._absmax(state)
    x, grad = torch.randn(rows, cols, dtype=torch.bfloat16), torch.randn(rows, outs, dtype=torch.bfloat16)
    for got, want in ((amx_4bit.forward(x, packed, absmax, state), x.double() @ dense.double().t()),
                      (amx_4bit.backward(grad, packed, absmax, state), grad.double() @ dense.double())):
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        error = (got.double() - want).abs()
        assert bool((error <= want.abs() * 2 ** -8 + want.abs().max() * 1e-5).all()), float(error.max())


@pytest.mark.parametrize("quant_type,nested,bias", [("nf4", False, False), ("fp4", True, True)])
def test_linear_takes_the_tiles_and_matches_the_dequantized_path(quant_type, nested, bias, monkeypatch):
    """``linear4bit_forward`` runs both matmuls in the tile kernels (where quant.bf16_matmul=auto) and gives the
    whole-weight path's values and gradients to bf16 rounding; a width the kernels cannot take falls back."""
    torch.manual_seed(1)
    layers = [linear4bit(128, 192, quant_type, nested, bias), linear4bit(192, 128, quant_type, nested, bias)]
    odd = linear4bit(128, 100, quant_type, nested, bias)   # 100 outputs: not a multiple of 32
    x = torch.randn(3, 7, 128, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(3, 7, 128, dtype=torch.bfloat16)
    calls = []
    for name in ("forward", "backward"):
        original = getattr(amx_4bit, name)
        monkeypatch.setattr(amx_4bit, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))

    def run(tiles):
        for layer in (*layers, odd):
            layer.qlorax_tiles = tiles
        x.grad = None
        for layer in layers:
            if bias:
                layer.bias.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = bnb_cpu.linear4bit_forward(layers[0], x)
            y = bnb_cpu.linear4bit_forward(layers[1], h) + bnb_cpu.linear4bit_forward(odd, x)[..., :1]
        y.backward(g)
        return [y.detach().float(), x.grad.float()] + [layer.bias.grad.float() for layer in layers if bias]

    tiled = run(True)
    assert calls == ["forward", "forward", "backward", "backward"]   # two layers each way; the odd one fell back
    calls.clear()
    whole = run(False)
    assert calls == []
    for got, want in zip(tiled, whole):
        assert float((got - want).norm() / want.norm()) < 1e-2

def test_empty_input_takes_the_whole_weight_path():
    """No rows: nothing for the tiles to do; the fallback returns the empty product."""
    layer = linear4bit(64, 64, "nf4", False, False)
    x = torch.randn(0, 64, dtype=torch.bfloat16)
    assert not amx_4bit.usable(layer.weight.quant_state, x)
    assert bnb_cpu.linear4bit_forward(layer, x).shape == (0, 64)

def test_use_tile_kernels_follows_the_config_and_counts_the_layers():
    """quant.bf16_matmul=torch turns the tiles off on every 4-bit layer; auto turns them on, and the report counts the
    layers whose shape fits."""
    model = torch.nn.Sequential(linear4bit(64, 64, "nf4", False, False), torch.nn.Linear(64, 64))
    assert bnb_cpu.use_tile_kernels(model, "torch") == {"matmul": "torch", "tile_layers": 0, "layers": 1}
    assert model[0].qlorax_tiles is False
    assert bnb_cpu.use_tile_kernels(model, "auto") == {"matmul": "amx", "tile_layers": 1, "layers": 1}
    assert model[0].qlorax_tiles is True and not hasattr(model[1], "qlorax_tiles")
    model.append(linear4bit(64, 100, "nf4", False, False))   # 100 outputs: not a multiple of 32
    assert bnb_cpu.use_tile_kernels(model, "auto") == {"matmul": "mixed", "tile_layers": 1, "layers": 2}

def test_chunks_and_blocks_are_sized_to_l2():
    assert amx_4bit.amx.chunk_rows(256, 2048, value_bytes=2) == 256    # 1 MiB of bf16 x: one chunk
    assert amx_4bit.amx.chunk_rows(1024, 2048, value_bytes=2) == 352   # 3 even chunks of at most 384 rows
    blocking = amx_4bit.blocking
    assert blocking(256, 5632) == (256, 704)                        # 8 even blocks of at most 768 rows
    assert blocking(1024, 5632) == (256, 1888)                      # beyond 512 rows: 3 even blocks of up to 2048
    assert blocking(1024, 2048) == (256, 2048)
    assert blocking(2048, 2048) == (128, 2048)                      # 1 MiB of sums: 128 columns; one block
    assert blocking(300, 5632) == (256, 704)
    assert blocking(64, 256) == (256, 256)                          # one block
    assert blocking(8192, 64) == (64, 64)                           # at least 64 columns
