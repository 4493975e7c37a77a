"""Token ids and labels of one example, and the train / eval split."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qlorax.errors import QloraxError
from qlorax.schema import DataConfig

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    segments: tuple[int, ...] = ()   # token counts of the examples packed into this one (packing.pack)


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    eval_rows: list[dict]
    stats: dict[str, Any] = field(default_factory=dict)


def tokenize(prompt: str, response: str, tokenizer, cfg: DataConfig) -> tuple[Example, bool]:
    """Token ids and labels (prompt masked unless train_on_inputs); returns (example, truncated)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    full_ids = tokenizer(prompt + response, add_special_tokens=True)["input_ids"]
    if cfg.add_eos_token and tokenizer.eos_token_id is not None:
        full_ids = full_ids + [tokenizer.eos_token_id]
    truncated = len(full_ids) > cfg.cutoff_len
    full_ids = full_ids[: cfg.cutoff_len]
    labels = list(full_ids)
    if not cfg.train_on_inputs:
        n = min(len(prompt_ids), len(labels))
        labels[:n] = [IGNORE_INDEX] * n
    return Example(full_ids, labels), truncated


def split_sizes(n_rows: int, val_set_size: float, source: str) -> int:
    n_eval = int(val_set_size) if val_set_size >= 1 else int(round(n_rows * val_set_size))
    if val_set_size > 0 and n_eval == 0:
        n_eval = 1
    if n_eval >= n_rows:
        raise QloraxError(f"data.val_set_size: the eval split ({n_eval} rows) is not smaller than the data "
                          f"({n_rows} rows in {source}); use data.val_set_size={max(0, n_rows // 10)} or a fraction like 0.05")
    return n_eval
