"""Rows -> checked, split and tokenized examples, cached in the run directory."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from qlorax.engine.data.chat import check_conversations, encoder
from qlorax.engine.data.coverage import check_signal
from qlorax.engine.data.examples import IGNORE_INDEX, Example, PreparedData, split_sizes, tokenize
from qlorax.engine.data.packing import pack
from qlorax.engine.data.readers import read_rows
from qlorax.engine.data.templates import check_fields, render
from qlorax.errors import QloraxError
from qlorax.paths import RunPaths
from qlorax.schema import DataConfig, RunSpec

log = logging.getLogger("qlorax")


def prepare(spec: RunSpec, tokenizer, paths: RunPaths | None = None) -> PreparedData:
    """Read, check, split and tokenize the data; reuse the run directory's cache when it matches."""
    import torch

    cfg = spec.data
    rows, source = read_rows(cfg)
    rows, skipped = check_rows(rows, cfg, source)
    no_signal = check_signal(rows, cfg, source) if cfg.chat_format == "none" else {}
    template = None
    if cfg.chat_format != "none":
        template, encode = encoder(cfg, tokenizer, rows, source)
    else:
        def encode(row: dict) -> tuple[Example, bool]:
            return tokenize(*render(row, cfg), tokenizer, cfg)
    key = _cache_key(cfg, source, tokenizer, template.text if template else "")
    cache = paths.data_cache / f"{key}.pt" if paths else None
    n_eval = split_sizes(len(rows), cfg.val_set_size, source)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.shuffle_seed)).tolist()
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    if cache is not None and cache.is_file():
        stored = torch.load(cache, weights_only=True)
        log.info("tokenized data: reusing cache %s", cache.name)
        return PreparedData([Example(*e) for e in stored["train"]], [Example(*e) for e in stored["eval"]],
                            [rows[i] for i in eval_idx], stored["stats"])
    truncated = 0
    examples = []
    for row in rows:
        example, cut = encode(row)
        truncated += cut
        examples.append(example)
    if truncated == len(rows) and len(rows) > 1:
        shortest = min(len(tokenizer("".join(render(row, cfg)))["input_ids"]) for row in rows)
        raise QloraxError(f"data: every one of the {len(rows)} rows in {source} is longer than data.cutoff_len="
                          f"{cfg.cutoff_len} tokens (the shortest has {shortest}), so no example would be trained "
                          f"whole; raise data.cutoff_len (e.g. data.cutoff_len={shortest + 1}) or shorten the rows")
    train = [examples[i] for i in train_idx]
    evals = [examples[i] for i in eval_idx]
    if cfg.packing:
        n_examples = len(train)
        train = pack(train, cfg.cutoff_len)
        fill = sum(len(e.input_ids) for e in train) / max(1, len(train) * cfg.cutoff_len)
        log.info("packing: %d examples into %d rows of at most %d tokens (%.0f%% filled); each example attends "
                 "only to itself", n_examples, len(train), cfg.cutoff_len, 100 * fill)
    trainable = [e for e in train if any(label != IGNORE_INDEX for label in e.labels)]
    if not trainable:
        raise QloraxError(f"data: no training example has answer tokens left after truncation to "
                          f"data.cutoff_len={cfg.cutoff_len}; raise data.cutoff_len")
    stats = {"rows": len(rows), "train_examples": len(train), "eval_examples": len(evals), "truncated": truncated,
             "source": source, "train_tokens": sum(len(e.input_ids) for e in train), **no_signal}
    if template is not None:
        stats.update(chat_template=template.name, skipped_rows=skipped)
    if truncated:
        log.warning("data: %d of %d rows are longer than data.cutoff_len=%d tokens and were truncated "
                    "(raise data.cutoff_len to keep them whole)", truncated, len(rows), cfg.cutoff_len)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save({"train": [(e.input_ids, e.labels, e.segments) for e in train],
                    "eval": [(e.input_ids, e.labels) for e in evals], "stats": stats}, tmp)
        tmp.replace(cache)
    return PreparedData(train, evals, [rows[i] for i in eval_idx], stats)


def check_rows(rows: list[dict], cfg: DataConfig, source: str) -> tuple[list[dict], int]:
    """The rows to train on and how many bad ones were skipped (conversations with data.skip_bad_rows);
    any other bad row raises, naming the row, the file and the fix."""
    if cfg.chat_format != "none":
        return check_conversations(rows, cfg, source)
    check_fields(rows, cfg, source)
    return rows, 0


def _cache_key(cfg: DataConfig, source: str, tokenizer, chat_template: str) -> str:
    h = hashlib.sha256()
    h.update(chat_template.encode())
    if cfg.packing:
        h.update(b"packing with document boundaries")   # caches of the old, leaking packing are not reused
    h.update(json.dumps({k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, default=str, sort_keys=True).encode())
    location = Path(source)
    if location.is_file():
        with location.open("rb") as content:   # streamed: a data file can be larger than memory
            h.update(hashlib.file_digest(content, "sha256").digest())
    else:
        h.update(source.encode())
    probe = "Tokenizer fingerprint: 0123456789 ->: ['a', 'b'] \u00e9\u4e2d"
    h.update(json.dumps([getattr(tokenizer, "name_or_path", ""), len(tokenizer), tokenizer(probe)["input_ids"],
                         tokenizer.eos_token_id, tokenizer.bos_token_id]).encode())
    return h.hexdigest()[:16]
