"""LoRA dropout from a hashed seed: the compiled kernel against its eager reference, rate, independence, replay."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from qlorax.engine import dropout as lora_dropout  # noqa: E402


@pytest.fixture(scope="module")
def kernel():
    compiled = lora_dropout._hashed_kernel()
    if compiled is None:
        pytest.skip("torch.compile is unavailable here: the drawn-mask fallback is tested in test_lean")
    return compiled


@pytest.mark.parametrize("shape,dtype", [((256, 2048), torch.bfloat16), ((1, 96), torch.bfloat16),
                                         ((37, 160), torch.float32), ((3, 5, 64), torch.bfloat16)])
def test_compiled_kernel_matches_the_eager_reference_bit_for_bit(kernel, shape, dtype):
    x = torch.randn(shape).to(dtype)
    for seed in (0, 12345, 2 ** 32 - 1):
        seed = torch.tensor(seed, dtype=torch.int64)
        want = lora_dropout.hashed_dropout(x, seed, lora_dropout.threshold(0.1), 1 / 0.9)
        assert torch.equal(kernel(x, seed, lora_dropout.threshold(0.1), 1 / 0.9), want)


def test_rate_and_independence_across_seeds_and_neighbours():
    """A property of the hash itself (the eager reference): it holds where torch.compile is unavailable too."""
    p = 0.05
    ones = torch.ones(1024, 2048)
    a = lora_dropout.hashed_dropout(ones, torch.tensor(1), lora_dropout.threshold(p), 1.0) == 0
    b = lora_dropout.hashed_dropout(ones, torch.tensor(2), lora_dropout.threshold(p), 1.0) == 0
    n = a.numel()
    tolerance = 4 * (p * (1 - p) / n) ** 0.5
    assert abs(a.float().mean().item() - p) < tolerance
    both = (a & b).float().mean().item()                        # seeds 1 and 2: element i vs element i + 1
    neighbours = (a[:, 1:] & a[:, :-1]).float().mean().item()
    rows = (a[1:] & a[:-1]).float().mean().item()
    for joint in (both, neighbours, rows):
        assert abs(joint - p * p) < 4 * (p * p / n) ** 0.5 + 1e-4


def test_drop_then_reapply_zeroes_the_same_elements_and_replays_from_the_generator():
    x = torch.randn(64, 96, dtype=torch.bfloat16)
    torch.manual_seed(5)
    dropped, token = lora_dropout.drop(x, 0.3)
    again = lora_dropout.reapply(torch.ones_like(x), token, 0.3)
    assert torch.equal(dropped == 0, again == 0)
    assert abs((dropped == 0).float().mean().item() - 0.3) < 0.03
    torch.manual_seed(5)                                        # a resumed run draws the same seed
    assert torch.equal(lora_dropout.drop(x, 0.3)[0], dropped)


def test_fused_lora_path_keeps_the_shared_input_not_a_dropped_copy_per_adapter():
    from qlorax.engine import lora_fused

    x = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    base = torch.randn(32, 48, dtype=torch.bfloat16)
    adapters = [(torch.randn(4, 64, requires_grad=True), torch.randn(48, 4, requires_grad=True)) for _ in range(3)]
    saved = []
    torch.manual_seed(11)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outs = [lora_fused._function().apply(x, base, a, b, 2.0, 0.1) for a, b in adapters]
    big = {t.untyped_storage().data_ptr() for t in saved if t.numel() >= x.numel()}
    assert big == {x.untyped_storage().data_ptr()}              # three adapters, one kept input
    weights = [torch.randn(o.shape) for o in outs]
    sum((o.float() * w).sum() for o, w in zip(outs, weights)).backward()
    got = [x.grad.clone()] + [t.grad.clone() for pair in adapters for t in pair]

    # the reference: plain autograd on the dropped inputs the same seeds give
    for t in [x] + [t for pair in adapters for t in pair]:
        t.grad = None
    torch.manual_seed(11)
    refs = []
    for a, b in adapters:
        dropped, _ = lora_dropout.drop(x, 0.1)
        refs.append(base + ((dropped @ a.to(x.dtype).t()) * 2.0) @ b.to(x.dtype).t())
    sum((r.float() * w).sum() for r, w in zip(refs, weights)).backward()
    want = [x.grad] + [t.grad for pair in adapters for t in pair]
    for o, r in zip(outs, refs):
        assert torch.allclose(o.float(), r.float(), rtol=2e-2, atol=2e-2)
    for g, w in zip(got, want):
        assert g.abs().sum() > 0
        assert torch.allclose(g.float(), w.float(), rtol=5e-2, atol=5e-2 * w.abs().max().item())
