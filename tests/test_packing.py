"""Packing with document boundaries: nothing dropped, nothing attends across examples."""
from __future__ import annotations

import pytest

from qlorax.engine import data as D
from qlorax.engine.tiny import build_tokenizer
from qlorax.spec import compose


def _examples(lengths, offset=0):
    return [D.Example([4 + (offset + 7 * k + i) % 250 for i in range(n)], [4 + (offset + 7 * k + i) % 250 for i in range(n)])
            for k, n in enumerate(lengths)]


def test_pack_keeps_every_example_whole_and_marks_boundaries():
    examples = _examples([30, 5, 17, 31, 2, 12, 9, 20])
    rows = D.pack(examples, 32)
    assert all(len(r.input_ids) <= 32 for r in rows)
    assert sum(len(r.input_ids) for r in rows) == sum(len(e.input_ids) for e in examples)   # no tail dropped
    assert len(rows) == 4   # first-fit decreasing reaches the minimum here: ceil(126 / 32)
    pieces = []
    for r in rows:
        start = 0
        assert sum(r.segments) == len(r.input_ids)
        for n in r.segments:
            pieces.append(tuple(r.input_ids[start:start + n]))
            assert r.labels[start] == D.IGNORE_INDEX   # never predicted from the previous example
            assert r.labels[start + 1:start + n] == r.input_ids[start + 1:start + n]
            start += n
    assert sorted(pieces) == sorted(tuple(e.input_ids) for e in examples)


def test_model_inputs_restart_positions_and_block_attention():
    ids, mask, _ = D.collate([D.Example([5] * 5, [5] * 5, (3, 2)), D.Example([6] * 4, [6] * 4)], pad_id=0)
    assert mask.tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]]
    inputs = D.model_inputs(ids, mask)
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    block = inputs["attention_mask"][:, 0].int().tolist()
    assert block[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert block[1][4] == [0, 0, 0, 0, 1]   # padding attends to itself only: no fully masked row
    plain = D.model_inputs(*D.collate([D.Example([5] * 3, [5] * 3)], pad_id=0)[:2])
    assert set(plain) == {"input_ids", "attention_mask"}   # unpacked batches are untouched


@pytest.mark.parametrize("precision,lean", [("fp32", False), ("bf16", True)])
def test_packed_batch_gives_the_same_per_example_losses(precision, lean, tmp_path):
    """Every example's loss in a packed batch equals its loss run alone (the model's own forward in
    fp32, the lean kernels' chunked loss under bf16 autocast)."""
    import torch

    from qlorax.engine.lean import make_lean
    from qlorax.engine.lm import autocast, loss_sum
    from qlorax.engine.model import attach_lora
    from qlorax.engine.quant import load_base_model
    from qlorax.engine.tiny import tiny_model_dir

    spec = compose(["quant=none", "lora.dropout=0"])
    torch.manual_seed(0)
    model = attach_lora(load_base_model(spec, str(tiny_model_dir()), "fp32"), spec)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)   # a non-zero adapter, so LoRA is part of what is compared
    if lean:
        make_lean(model, autocast=True)
    model.eval()
    examples = _examples([23, 9, 40, 14, 31, 6, 18], offset=3)
    rows = D.pack(examples, 48)
    assert any(len(r.segments) > 1 for r in rows)
    with torch.no_grad(), autocast(precision):
        alone = [float(loss_sum(model, *D.collate([e], pad_id=3))[0]) for e in examples]
        packed_total, packed_count = loss_sum(model, *D.collate(rows, pad_id=3))
        ids, mask, labels = D.collate(rows, pad_id=3)
        logits = model(**D.model_inputs(ids, mask)).logits.float()
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                  ignore_index=D.IGNORE_INDEX, reduction="none")
    doc = mask[:, 1:]
    packed = []
    for r, row in enumerate(rows):
        packed += [float(per_token[r][doc[r] == k].sum()) for k in range(1, len(row.segments) + 1)]
    by_content = {tuple(e.input_ids): loss for e, loss in zip(examples, alone)}
    order = [tuple(row.input_ids[s:s + n]) for row in rows for s, n in _starts(row.segments)]
    rtol = 2e-2 if precision == "bf16" else 1e-5
    for piece, loss in zip(order, packed):
        assert loss == pytest.approx(by_content[piece], rel=rtol)
    assert float(packed_total) == pytest.approx(sum(alone), rel=rtol)
    assert packed_count == sum(len(e.input_ids) - 1 for e in examples)


def _starts(segments):
    start = 0
    for n in segments:
        yield start, n
        start += n


def test_packing_in_prepare_keeps_every_token(tmp_path):
    tokenizer = build_tokenizer()
    plain = D.prepare(compose(["data.cutoff_len=96", "data.val_set_size=0"]), tokenizer)
    packed = D.prepare(compose(["data.packing=true", "data.cutoff_len=96", "data.val_set_size=0"]), tokenizer)
    assert all(len(e.input_ids) <= 96 for e in packed.train)
    assert len(packed.train) < len(plain.train)
    assert sum(len(e.input_ids) for e in packed.train) == sum(len(e.input_ids) for e in plain.train)
    assert sum(1 for e in packed.train for t in e.labels[1:] if t != D.IGNORE_INDEX) == \
        sum(1 for e in plain.train for t in e.labels[1:] if t != D.IGNORE_INDEX)


def test_memory_plan_counts_the_block_mask():
    from qlorax.memory import estimate

    plain = estimate(compose(["data.cutoff_len=1024", "train.micro_batch_size=2"]))
    packed = estimate(compose(["data.cutoff_len=1024", "train.micro_batch_size=2", "data.packing=true"]))
    assert packed.activations - plain.activations == 2 * 1024 ** 2
