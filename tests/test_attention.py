"""Attention's backward on AMX tiles (qlorax/engine/attention.py) against fp64 and transformers' SDPA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qlorax.engine import attention

needs_amx = pytest.mark.skipif(attention.library() is None, reason="no AMX-BF16 on this CPU (or the kernel did not build)")


def _rel(a, b) -> float:
    return float((a.double() - b).norm() / b.norm())


def _inputs(batch, heads, kv_heads, length, dim, seed=0):
    """q, k, v and the output's gradient as a model hands them over: [B, H, L, D] views of [B, L, H, D]."""
    torch.manual_seed(seed)
    q = (torch.randn(batch, length, heads, dim) * 2).bfloat16().transpose(1, 2)
    k, v = ((torch.randn(batch, length, kv_heads, dim) * 2).bfloat16().transpose(1, 2) for _ in range(2))
    grad = torch.randn(batch, length, heads, dim).bfloat16().transpose(1, 2)
    return q, k, v, grad


def _reference(q, k, v, grad, mask, dtype):
    """SDPA's (dq, dk, dv) in ``dtype``, GQA by repeating k and v."""
    rep = q.shape[1] // k.shape[1]
    a, b, c = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(a, b.repeat_interleave(rep, 1), c.repeat_interleave(rep, 1), attn_mask=mask,
                                         is_causal=mask is None)
    return torch.autograd.grad(out, (a, b, c), grad.to(dtype))


def _padding_mask(lengths, length):
    mask = torch.ones(length, length, dtype=torch.bool).tril().repeat(len(lengths), 1, 1, 1)
    for row, n in enumerate(lengths):
        mask[row, :, :, n:] = False
    return mask


def _packed_mask(documents):
    docs = torch.tensor(documents)
    causal = torch.ones(len(documents), len(documents), dtype=torch.bool).tril()
    return ((docs[:, None] == docs[None, :]) & causal)[None, None]


@needs_amx
@pytest.mark.parametrize("batch,heads,kv_heads,length,dim,mask", [
    (1, 4, 2, 70, 64, None),                                # GQA, a length that is not a multiple of 32
    (2, 4, 4, 33, 32, None),
    (2, 4, 2, 50, 64, "padding"),                           # right padding: the second row's queries past 31
    (1, 4, 1, 50, 128, "packed"),                           # two documents in one row
    (2, 8, 2, 256, 64, None),
])
def test_backward_is_closer_to_fp64_than_torchs_kernel(batch, heads, kv_heads, length, dim, mask):
    q, k, v, grad = _inputs(batch, heads, kv_heads, length, dim)
    if mask == "padding":
        mask = _padding_mask([length, 31], length)
    elif mask == "packed":
        mask = _packed_mask([0] * 20 + [1] * (length - 20))
    exact = _reference(q, k, v, grad, mask, torch.float64)
    flash = _reference(q, k, v, grad, mask, torch.bfloat16)
    mine = attention.backward(q, k, v, grad, mask, dim ** -0.5)
    for got, theirs, want in zip(mine, flash, exact):
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        assert _rel(got, want) < 3.5e-3 and _rel(got, want) < _rel(theirs, want)


@needs_amx
def test_each_tensor_is_read_through_its_own_strides():
    """k a [B, L, Hk, D] view and v contiguous [B, Hk, L, D]; the output's gradient contiguous; one packed mask for a
    batch of 2 (broadcast)."""
    q, k, v, grad = _inputs(2, 4, 2, 48, 64, seed=1)
    v, grad = v.contiguous(), grad.contiguous()
    mask = _packed_mask([0] * 20 + [1] * 28)
    exact = _reference(q, k, v, grad, mask, torch.float64)
    for got, want in zip(attention.backward(q, k, v, grad, mask, 64 ** -0.5), exact):
        assert _rel(got, want) < 3.5e-3


@needs_amx
def test_a_query_that_sees_nothing_gets_zero_gradients():
    q, k, v, grad = _inputs(1, 2, 2, 40, 32)
    mask = _padding_mask([40], 40)
    mask[0, 0, 5] = False   # query 5 sees no key
    dq, dk, dv = attention.backward(q, k, v, grad, mask, 32 ** -0.5)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert not dq[0, :, 5].any()
    keep = torch.ones(40, dtype=torch.bool)
    keep[5] = False
    exact = _reference(q[:, :, keep], k, v, grad[:, :, keep], mask[:, :, keep], torch.float64)
    assert _rel(dq[:, :, keep], exact[0]) < 3.5e-3 and _rel(dk, exact[1]) < 3.5e-3 and _rel(dv, exact[2]) < 3.5e-3


def _tiny_llama(attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).to(torch.bfloat16)


@needs_amx
def test_a_model_trains_through_it_with_sdpas_forward_bits(monkeypatch):
    reference, model = _tiny_llama(), _tiny_llama()
    assert attention.enable(model) and model.config._attn_implementation == attention.NAME
    ran = []
    real = attention.backward
    monkeypatch.setattr(attention, "backward", lambda *a: ran.append(a[0].shape) or real(*a))
    ids = torch.randint(0, 96, (2, 40))
    padding = torch.ones(2, 40, dtype=torch.long)
    padding[1, 30:] = 0
    for mask in (None, padding):
        outs = []
        for m in (reference, model):
            m.zero_grad()
            logits = m(input_ids=ids, attention_mask=mask).logits
            logits.float().logsumexp(-1).mean().backward()
            outs.append((logits, {n: p.grad for n, p in m.named_parameters()}))
        (want, want_grads), (got, got_grads) = outs
        assert torch.equal(got, want)   # the forward is SDPA's own
        for name, g in want_grads.items():
            assert _rel(got_grads[name], g.double()) < 2e-2, name
    assert len(ran) == 4   # 2 layers x 2 batches
    with torch.no_grad():   # evaluation and generation: SDPA as it is
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert len(ran) == 4


def test_calls_it_cannot_take_run_sdpa():
    q, k, v, _ = (t.requires_grad_() for t in _inputs(1, 4, 2, 64, 32))
    module = torch.nn.Module()
    causal = _padding_mask([64], 64)
    assert attention.takes(module, q, k, v, None, {}) and attention.takes(module, q, k, v, causal, {})
    beyond = causal.clone()
    beyond[0, 0, 3, 9] = True   # a query that sees a later key: not causal
    refused = [
        (q, k, v, beyond, {}), (q, k, v, causal.float(), {}), (q, k, v, None, {"is_causal": False}),
        (q, k, v, None, {"softcap": 30.0}), (q.float(), k.float(), v.float(), None, {}),
        (q.detach(), k.detach(), v.detach(), None, {}),
    ]
    for args in refused:
        assert not attention.takes(module, *args)
    q48, k48, v48, _ = (t.requires_grad_() for t in _inputs(1, 4, 2, 64, 48))
    assert not attention.takes(module, q48, k48, v48, None, {})   # head size not a multiple of 32
    long = attention.MAX_LENGTH + 32
    ql, kl, vl, _ = (t.requires_grad_() for t in _inputs(1, 2, 2, long, 32))
    assert not attention.takes(module, ql, kl, vl, None, {})
    with torch.no_grad():
        assert not attention.takes(module, q, k, v, None, {})


def test_models_on_other_attention_implementations_are_left_alone():
    model = _tiny_llama("eager")
    assert not attention.enable(model) and model.config._attn_implementation == "eager"


def test_transformers_without_the_attention_interface_keeps_its_own(monkeypatch):
    """The bigdl environment's transformers (4.37) predates the attention and mask interfaces: training goes on with
    SDPA."""
    import sys

    model = _tiny_llama()
    monkeypatch.setitem(sys.modules, "transformers.masking_utils", None)   # its import now fails
    assert not attention.enable(model) and model.config._attn_implementation == "sdpa"
    monkeypatch.undo()
    assert attention.enable(model) == (attention.library() is not None)   # the same model, with the interfaces
