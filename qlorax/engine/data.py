"""Rows -> prompt/response text -> token ids and labels, split, cached, and batched.

Reading errors name the file and line; a template field missing from a row names the field,
the file and the row. The sample order is a pure function of (seed, epoch, position), so a
resumed run, or any rank, can compute exactly which examples a step uses.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from qlorax.errors import QloraxError
from qlorax.paths import RunPaths
from qlorax.schema import DataConfig, RunSpec

log = logging.getLogger("qlorax")
IGNORE_INDEX = -100


# ---------------------------------------------------------------- reading rows
def data_source(cfg: DataConfig) -> tuple[str, str]:
    """(location, format) with 'builtin:sample' and 'auto' resolved."""
    if cfg.path == "builtin:sample":
        return str(resources.files("qlorax.assets") / "sample.jsonl"), "jsonl"
    path = Path(cfg.path).expanduser()
    fmt = cfg.format
    if fmt == "auto":
        if path.is_dir():
            fmt = "disk"
        elif path.suffix.lower() in (".json", ".jsonl", ".csv", ".parquet"):
            fmt = path.suffix.lower()[1:]
        elif not path.exists() and cfg.path.count("/") == 1 and not cfg.path.startswith((".", "/", "~")):
            fmt = "hub"
        else:
            raise QloraxError(f"data.path: cannot tell the format of {cfg.path} "
                              "(expected .json, .jsonl, .csv, .parquet, a datasets directory or a hub id); "
                              "set data.format=json|jsonl|csv|parquet|disk|hub")
    if fmt != "hub" and not path.exists():
        raise QloraxError(f"data.path: {cfg.path} does not exist; give a local data file "
                          "(json, jsonl, csv, parquet) or a hub id like Abirate/english_quotes")
    return (cfg.path if fmt == "hub" else str(path.resolve())), fmt


def read_rows(cfg: DataConfig) -> tuple[list[dict], str]:
    source, fmt = data_source(cfg)
    reader = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet,
              "disk": _read_datasets, "hub": _read_datasets}[fmt]
    rows = reader(source, cfg)
    if not rows:
        raise QloraxError(f"data.path: {source} holds no rows; point data.path at a non-empty file")
    if cfg.max_rows:
        rows = rows[: cfg.max_rows]
    return rows, source


def _text(source: str) -> str:
    raw = Path(source).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise QloraxError(f"data.path: {source} line {line}: bytes that are not UTF-8 at offset {exc.start} "
                          f"({raw[exc.start:exc.start + 4]!r}); re-encode the file as UTF-8 "
                          "(for example: iconv -f latin1 -t utf-8)") from None


def _read_jsonl(source: str, cfg: DataConfig) -> list[dict]:
    rows = []
    for number, line in enumerate(_text(source).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QloraxError(f"data.path: {source} line {number}: invalid JSON ({exc.msg} at column {exc.colno}); "
                              "fix that line (each line must be one JSON object)") from None
        if not isinstance(row, dict):
            raise QloraxError(f"data.path: {source} line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _read_json(source: str, cfg: DataConfig) -> list[dict]:
    text = _text(source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("{") and "\n{" in text:
            return _read_jsonl(source, cfg)   # JSON lines saved as .json
        raise QloraxError(f"data.path: {source} line {exc.lineno}: invalid JSON ({exc.msg}); fix the file") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise QloraxError(f"data.path: {source} must hold a list of JSON objects (or a JSON-lines file)")
    return data


def _read_csv(source: str, cfg: DataConfig) -> list[dict]:
    return [dict(row) for row in csv.DictReader(io.StringIO(_text(source)))]


def _read_parquet(source: str, cfg: DataConfig) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise QloraxError("reading parquet needs pyarrow: pip install 'qlorax[parquet]'") from None
    return pq.read_table(source).to_pylist()


def _read_datasets(source: str, cfg: DataConfig) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise QloraxError(f"data.path: {source} is a datasets directory or hub id, which needs the datasets "
                          "library: pip install 'qlorax[datasets]' (or export the data to a jsonl file)") from None
    if Path(source).is_dir():
        loaded = datasets.load_from_disk(source)
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[cfg.split]
    else:
        loaded = datasets.load_dataset(source, split=cfg.split)
    return list(loaded)


# ---------------------------------------------------------------- templates
def template_fields(template: str | None) -> list[str]:
    if not template:
        return []
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def render(row: dict, cfg: DataConfig, with_response: bool = True) -> tuple[str, str]:
    """(prompt, response) text of one row."""
    prompt = cfg.prompt
    if cfg.prompt_when_empty is not None and not str(row.get(cfg.empty_field) or "").strip():
        prompt = cfg.prompt_when_empty
    values = {k: ("" if v is None else v) for k, v in row.items()}
    return prompt.format_map(values), (cfg.response.format_map(values) if with_response else "")


def check_fields(rows: list[dict], cfg: DataConfig, source: str) -> None:
    needed = set(template_fields(cfg.response))
    for index, row in enumerate(rows, start=1):
        prompt = cfg.prompt
        if cfg.prompt_when_empty is not None and not str(row.get(cfg.empty_field) or "").strip():
            prompt = cfg.prompt_when_empty
        missing = sorted((set(template_fields(prompt)) | needed) - set(row))
        if missing:
            raise QloraxError(f"data.prompt/data.response: field {missing[0]!r} is not in row {index} of {source} "
                              f"(its fields: {', '.join(sorted(row)) or 'none'}); fix the template, e.g. "
                              f"data.prompt=\"{{{sorted(row)[0] if row else 'text'}}} ->: \"")


# ---------------------------------------------------------------- tokenizing
@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


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


def prepare(spec: RunSpec, tokenizer, paths: RunPaths | None = None) -> PreparedData:
    """Read, check, split and tokenize the data; reuse the run directory's cache when it matches."""
    import torch

    cfg = spec.data
    rows, source = read_rows(cfg)
    check_fields(rows, cfg, source)
    key = _cache_key(cfg, source, tokenizer)
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
        example, cut = tokenize(*render(row, cfg), tokenizer, cfg)
        truncated += cut
        examples.append(example)
    train = [examples[i] for i in train_idx]
    evals = [examples[i] for i in eval_idx]
    if cfg.packing:
        train = pack(train, cfg.cutoff_len)
    trainable = [e for e in train if any(label != IGNORE_INDEX for label in e.labels)]
    if not trainable:
        raise QloraxError(f"data: no training example has answer tokens left after truncation to "
                          f"data.cutoff_len={cfg.cutoff_len}; raise data.cutoff_len")
    stats = {"rows": len(rows), "train_examples": len(train), "eval_examples": len(evals), "truncated": truncated,
             "source": source, "train_tokens": sum(len(e.input_ids) for e in train)}
    if truncated:
        log.warning("data: %d of %d rows are longer than data.cutoff_len=%d tokens and were truncated "
                    "(raise data.cutoff_len to keep them whole)", truncated, len(rows), cfg.cutoff_len)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save({"train": [(e.input_ids, e.labels) for e in train],
                    "eval": [(e.input_ids, e.labels) for e in evals], "stats": stats}, tmp)
        tmp.replace(cache)
    return PreparedData(train, evals, [rows[i] for i in eval_idx], stats)


def pack(examples: list[Example], block: int) -> list[Example]:
    """Concatenate examples and cut them into full blocks of ``block`` tokens."""
    ids, labels = [], []
    for e in examples:
        ids += e.input_ids
        labels += e.labels
    return [Example(ids[i:i + block], labels[i:i + block]) for i in range(0, len(ids) - block + 1, block)]


def _cache_key(cfg: DataConfig, source: str, tokenizer) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, default=str, sort_keys=True).encode())
    location = Path(source)
    if location.is_file():
        h.update(location.read_bytes())
    else:
        h.update(source.encode())
    probe = "Tokenizer fingerprint: 0123456789 ->: ['a', 'b'] \u00e9\u4e2d"
    h.update(json.dumps([getattr(tokenizer, "name_or_path", ""), len(tokenizer), tokenizer(probe)["input_ids"],
                         tokenizer.eos_token_id, tokenizer.bos_token_id]).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- batching
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
    """Right-padded tensors: input_ids, attention_mask, labels (padding masked)."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return ids, mask, labels
