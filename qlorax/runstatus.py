"""status.json of a run directory, and the listing behind ``qlorax runs``."""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from qlorax.errors import QloraxError, is_disk_full
from qlorax.paths import RunPaths, read_json


def write(paths: RunPaths, state: str, stage: str, **extra) -> None:
    """Record the state (running / finished / failed / interrupted) of a stage, atomically."""
    kept = {k: v for k, v in read(paths).items() if k in ("step", "total_steps")}   # later stages keep train's
    record = {**kept, "state": state, "stage": stage, "pid": os.getpid(), "host": os.uname().nodename,
              "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
    paths.root.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record)
    tmp = paths.status.with_suffix(".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, paths.status)
    except OSError:
        # A full disk has no block for a new file, but the old status.json has one: rewrite it in place.
        tmp.unlink(missing_ok=True)
        with paths.status.open("r+" if paths.status.is_file() else "w") as f:
            f.write(text)
            f.truncate()


@contextlib.contextmanager
def tracking(paths: RunPaths, stage: str, enabled: bool = True):
    """status.json says running while the block runs, then failed or interrupted if it raises."""
    if enabled:
        write(paths, "running", stage)
    try:
        yield
    except BaseException as exc:
        full = is_disk_full(exc) and not isinstance(exc, QloraxError)   # those already say what is intact
        error = QloraxError(disk_full_message(paths, stage, exc)) if full else exc
        if enabled:
            interrupted = isinstance(exc, KeyboardInterrupt) or getattr(exc, "exit_code", None) == 130
            with contextlib.suppress(OSError):   # the original error matters more than recording it
                write(paths, "interrupted" if interrupted else "failed", stage,
                      error=str(error)[:500] or type(exc).__name__)
        if full:
            raise error from None
        raise


@contextlib.contextmanager
def disk_full_reported(paths: RunPaths, stage: str):
    """A write that fails for lack of space inside the block ends in one message saying what is intact."""
    try:
        yield
    except Exception as exc:
        if is_disk_full(exc) and not isinstance(exc, QloraxError):
            raise QloraxError(disk_full_message(paths, stage, exc)) from None
        raise


def disk_full_message(paths: RunPaths, stage: str, exc: BaseException) -> str:
    """What a full disk interrupted, what is still intact, and how to continue."""
    if stage in ("train", "run"):
        checkpoints = paths.checkpoint_dirs()
        intact = (f"the last complete checkpoint {checkpoints[-1][1].name} is intact" if checkpoints
                  else "no checkpoint had been written yet")
    elif stage == "merge":
        intact = "the previous merged/ is intact" if paths.merged.is_dir() else "no merged model was written"
    else:
        intact = "earlier stages' outputs are intact"
    if paths.merge_staging_dirs() or (paths.checkpoints.is_dir() and any(paths.checkpoints.glob(".tmp-*"))):
        intact += " (partial files are removed on the next run)"
    detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return (f"{stage}: the disk holding {paths.root} is full ({detail}); {intact}; free some space, then rerun "
            f"`qlorax {stage} run_dir={paths.root}`" + (" (it resumes)" if stage in ("train", "run") else ""))


def read(paths: RunPaths) -> dict:
    return read_json(paths.status)


def _alive(pid: int, host: str) -> bool:
    if host != os.uname().nodename:
        return True   # cannot tell from here; trust the record
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunRow:
    path: Path
    status: str
    steps: str
    final_loss: str
    outputs: str


def describe(run_dir: Path) -> RunRow:
    """Status of one run: running, finished, failed, interrupted/killed -> resumable, or new."""
    paths = RunPaths(run_dir)
    record = read(paths)
    state = record.get("state", "new")
    checkpoints = paths.checkpoint_dirs()
    if state == "running" and not _alive(int(record.get("pid", 0)), record.get("host", "")):
        state = "killed"
    if state in ("killed", "interrupted", "failed") and checkpoints:
        state = f"{state}, resumable"
    final_loss, steps = "-", "-"
    lines = paths.metrics.read_text().splitlines() if paths.metrics.is_file() else []
    for line in reversed(lines):
        try:
            last = json.loads(line)
        except ValueError:
            continue
        final_loss, steps = f"{last['loss']:.4f}", str(last["step"])
        break
    total = record.get("total_steps")
    if total:
        steps = f"{steps}/{total}"
    outputs = [p.name for p in (paths.merged, paths.verify, paths.export, paths.report) if p.exists()]
    if checkpoints:
        outputs.insert(0, f"checkpoints/{checkpoints[-1][1].name}")
    if state == "failed" and record.get("error"):
        outputs.append(f"error: {record['error'][:60]}")
    return RunRow(paths.root, state, steps, final_loss, ", ".join(outputs) or "-")


def find_runs(root: Path) -> list[Path]:
    """Run directories (holding spec.yaml) under ``root``, newest first."""
    if (root / "spec.yaml").is_file():
        return [root]
    found = [p.parent for p in root.rglob("spec.yaml") if ".hydra" not in p.parts]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
