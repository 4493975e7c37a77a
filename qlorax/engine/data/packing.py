"""Packing several examples into one block of ``cutoff_len`` tokens."""
from __future__ import annotations

from qlorax.engine.data.examples import Example


def pack(examples: list[Example], block: int) -> list[Example]:
    """Concatenate examples and cut them into full blocks of ``block`` tokens."""
    ids, labels = [], []
    for e in examples:
        ids += e.input_ids
        labels += e.labels
    return [Example(ids[i:i + block], labels[i:i + block]) for i in range(0, len(ids) - block + 1, block)]
