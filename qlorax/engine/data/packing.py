"""Packing several examples into one row of at most ``cutoff_len`` tokens, with document boundaries.

A packed row keeps each example whole: its position ids restart at 0 and its tokens attend only
to earlier tokens of the same example (a block-diagonal causal mask, given to SDPA as a 4-D bool
mask). Nothing is dropped: the examples are placed first-fit by decreasing length and the last,
partial rows are padded like any unpacked batch.

Why a 4-D mask and not a variable-length path: on this CPU (2 threads, torch 2.13), forward +
backward of one SDPA call with the block mask ran 7-9x faster (bf16) than a loop of one causal
SDPA call per example for 256-token rows of ~50-token examples, 1.4-1.9x at 1024-2048 tokens, and
about even only for long examples in fp32 (``python benchmarks/bench.py --packing`` prints it).
SDPA takes a bool mask in its flash kernel, so nothing of size heads x tokens^2 is materialized.

In a batch, the attention mask holds each token's document number (1, 2, ... in its row; 0 for
padding) instead of 0/1: ``model_inputs`` turns it into the 4-D mask and the position ids.
"""
from __future__ import annotations

from qlorax.engine.data.examples import IGNORE_INDEX, Example


def pack(examples: list[Example], block: int) -> list[Example]:
    """Examples placed whole into rows of at most ``block`` tokens (first-fit decreasing)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        slot = next((r for r, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([])
            room.append(block)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= n
    return [_join([examples[i] for i in sorted(members)]) for members in rows]


def _join(parts: list[Example]) -> Example:
    ids, labels = [], []
    for e in parts:
        ids += e.input_ids
        # The first token of an example is never a target (nothing precedes it): without this the
        # last token of the previous example would learn to predict it.
        labels += [IGNORE_INDEX] + list(e.labels[1:])
    return Example(ids, labels, tuple(len(e.input_ids) for e in parts))


def document_numbers(example: Example) -> list[int]:
    """1-based document number of every token of ``example`` (all 1 when it is not packed)."""
    if not example.segments:
        return [1] * len(example.input_ids)
    numbers: list[int] = []
    for k, n in enumerate(example.segments, start=1):
        numbers += [k] * n
    return numbers


def model_inputs(ids, mask) -> dict:
    """Keyword arguments of the model's forward: a 0/1 padding mask as it is; document numbers
    (packed rows) as a block-diagonal causal 4-D bool mask plus restarting position ids."""
    import torch

    if mask.numel() == 0 or int(mask.max()) <= 1:
        return {"input_ids": ids, "attention_mask": mask}
    # Padding becomes one more document of its row, so that no query row is fully masked (NaN in SDPA).
    docs = torch.where(mask > 0, mask, mask.max(dim=1, keepdim=True).values + 1)
    width = ids.shape[1]
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    index = torch.arange(width).expand_as(docs)
    start_of_doc = torch.cummax(torch.where(starts, index, 0), dim=1).values
    position_ids = index - start_of_doc
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    block = (docs[:, :, None] == docs[:, None, :]) & causal
    return {"input_ids": ids, "attention_mask": block[:, None, :, :], "position_ids": position_ids}
