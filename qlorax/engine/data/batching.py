"""Which examples each rank runs at each step, and their padded tensors.

The sample order is a pure function of (seed, epoch, position), so a resumed run, or any rank,
can compute exactly which examples a step uses.
"""
from __future__ import annotations

from qlorax.engine.data.examples import IGNORE_INDEX, Example
from qlorax.engine.data.packing import document_numbers


def stream_index(position: int, n_train: int, seed: int) -> int:
    """The example at ``position`` of the endless, per-epoch reshuffled sample stream."""
    epoch, offset = divmod(position, n_train)
    return _permutation(n_train, seed + epoch)[offset]


_PERM_CACHE: dict[tuple[int, int], list[int]] = {}


def _permutation(n: int, seed: int) -> list[int]:
    import torch

    key = (n, seed)
    if key not in _PERM_CACHE:
        _PERM_CACHE.clear()
        _PERM_CACHE[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return _PERM_CACHE[key]


def rank_micro_batches(step: int, global_batch: int, micro: int, rank: int, world: int,
                       n_train: int, seed: int) -> list[list[int]]:
    """Example indices of each micro-batch this rank runs for optimizer ``step``."""
    per_rank = global_batch // world
    start = step * global_batch + rank * per_rank
    positions = list(range(start, start + per_rank))
    return [[stream_index(p, n_train, seed) for p in positions[i:i + micro]] for i in range(0, per_rank, micro)]


def global_target_tokens(step: int, global_batch: int, examples: list[Example], seed: int) -> int:
    """Loss tokens in the whole global batch: every rank divides by the same number."""
    n = len(examples)
    total = 0
    for p in range(step * global_batch, (step + 1) * global_batch):
        labels = examples[stream_index(p, n, seed)].labels
        total += sum(1 for t in labels[1:] if t != IGNORE_INDEX)
    return max(total, 1)


def collate(batch: list[Example], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, labels (padding masked).

    The attention mask is 0 on padding and, on tokens, the number of their document in the row:
    1 everywhere unless the row is packed (``packing.model_inputs`` reads it)."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = torch.tensor(document_numbers(e))
    return ids, mask, labels
