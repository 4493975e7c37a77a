"""Reading rows from json / jsonl / csv / parquet files, datasets directories and hub ids.

Every reading error names the file (and line) and what to fix.
"""
from __future__ import annotations

import csv
import io
import json
from importlib import resources
from pathlib import Path

from qlorax.errors import QloraxError
from qlorax.schema import DataConfig


def data_source(cfg: DataConfig) -> tuple[str, str]:
    """(location, format) with 'builtin:NAME' (sample, chat) and 'auto' resolved."""
    if cfg.path.startswith("builtin:"):
        shipped = resources.files("qlorax.assets") / f"{cfg.path.split(':', 1)[1]}.jsonl"
        if not shipped.is_file():
            raise QloraxError(f"data.path: {cfg.path} is not shipped data; use builtin:sample, builtin:chat "
                              "or a local file")
        return str(shipped), "jsonl"
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
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("{") and "\n{" in text:
            return _read_jsonl(source, cfg)   # JSON lines saved as .json
        raise QloraxError(f"data.path: {source} line {exc.lineno}: invalid JSON ({exc.msg}); fix the file") from None
    if isinstance(data, dict):
        data = _rows_in_object(data, source, cfg)
    if not isinstance(data, list):
        raise QloraxError(f"data.path: {source} must hold a list of JSON objects (or a JSON-lines file), "
                          f"not a {type(data).__name__}")
    wrong = next((i for i, r in enumerate(data, start=1) if not isinstance(r, dict)), None)
    if wrong is not None:
        raise QloraxError(f"data.path: {source} must hold a list of JSON objects (or a JSON-lines file); "
                          f"item {wrong} is a {type(data[wrong - 1]).__name__}")
    return data


def _rows_in_object(data: dict, source: str, cfg: DataConfig) -> list:
    """The row list inside a top-level object: {"train": [...]} (its only list, or the one named data.split)."""
    lists = {k: v for k, v in data.items() if isinstance(v, list)}
    if cfg.split in lists:
        return lists[cfg.split]
    if len(lists) == 1:
        return next(iter(lists.values()))
    if lists:
        raise QloraxError(f"data.path: {source} holds an object with several lists ({', '.join(lists)}) and none "
                          f"is named data.split={cfg.split!r}; pick one with data.split={next(iter(lists))}")
    raise QloraxError(f"data.path: {source} holds one JSON object (keys: {', '.join(list(data)[:8])}), not a list "
                      "of rows; put the rows in a list [{...}, {...}] or write one object per line (.jsonl)")


def _read_csv(source: str, cfg: DataConfig) -> list[dict]:
    # strict: an unclosed quote is an error, not a field that silently swallows the rest of the file
    reader = csv.DictReader(io.StringIO(_text(source)), strict=True)
    rows = []
    try:
        for row in reader:
            if None in row or None in row.values():   # more / fewer fields than the header
                raise csv.Error(f"{len(reader.fieldnames)} columns in the header, a different number on this line")
            rows.append(row)
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            raise QloraxError(f"data.path: {source}: a quote opened after line {reader.line_num} is never closed "
                              "(not valid CSV); close it, or double any quote inside a field (\"\")") from None
        raise QloraxError(f"data.path: {source} line {reader.line_num}: not valid CSV ({exc}); fix that line") from None
    return rows


def _read_parquet(source: str, cfg: DataConfig) -> list[dict]:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise QloraxError("reading parquet needs pyarrow: pip install 'qlorax[parquet]'") from None
    try:
        return pq.read_table(source).to_pylist()
    except (pyarrow.ArrowException, OSError) as exc:
        raise QloraxError(f"data.path: {source} is not a readable parquet file ({str(exc).splitlines()[0]}); "
                          "write it again (for example pandas' DataFrame.to_parquet) or export the rows as jsonl") from None


# What datasets' save_to_disk writes: a Dataset's state, or a DatasetDict's split list.
DATASETS_DIR_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")


def _read_datasets(source: str, cfg: DataConfig) -> list[dict]:
    folder = Path(source)
    if folder.is_dir() and not any((folder / marker).is_file() for marker in DATASETS_DIR_MARKERS):
        files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".json", ".jsonl", ".csv", ".parquet"))
        hint = (f"point data.path at one of its files ({', '.join(files[:5])})" if files
                else "point data.path at a json, jsonl, csv or parquet file")
        raise QloraxError(f"data.path: {source} is a plain directory, not a datasets save_to_disk directory "
                          f"(it has no {' / '.join(DATASETS_DIR_MARKERS)}); {hint}")
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
