"""The always-on sink: run_dir/metrics.jsonl, one JSON object per logged step."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qlorax.paths import RunPaths
from qlorax.schema import RunSpec


class JsonlSink:
    def __init__(self, path: Path):
        self.path = path
        self.where = str(path)
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self, outcome: str) -> None:
        pass   # every record is already on disk


def open_sink(spec: RunSpec, paths: RunPaths, start_step: int) -> JsonlSink:
    """Append to metrics.jsonl, first dropping records past ``start_step`` (they are redone on resume)."""
    truncate_metrics(paths.metrics, start_step)
    return JsonlSink(paths.metrics)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl ([] when absent), skipping a line cut short by a kill."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records past ``last_step`` (and any line cut by a kill) before a resumed run appends."""
    if not path.is_file():
        return
    kept = [json.dumps(r) for r in read_metrics(path) if r.get("step", 0) <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
