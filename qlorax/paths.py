"""The one module that knows where every artifact lives in a run directory.

    run_dir/
      spec.yaml                 resolved run spec (the only file crossing process/pod boundaries)
      inputs.json               digests of the data file and model files the checkpoints were trained on
      status.json               state of the last stage: running / finished / failed / interrupted
      .lock                     held by the one qlorax process working in the run (pid, host, command)
      train.log                 console log of rank 0
      metrics.jsonl             one JSON object per logged step (step, loss, learning_rate, epoch, ...)
      train_summary.json        totals of the train stage: steps, losses, tokens/s, memory, weight bytes
      data_cache/               tokenized data, keyed by data spec and tokenizer
      checkpoints/step-000100/  adapter (peft format) + trainer_state.pt + manifest.json
      merged/                   merged model in plain Hugging Face format (+ merge_info.json)
      .merged-*/                merge staging directory (renamed to merged/ when complete)
      verify.json               base vs fine-tuned generations and held-out perplexity
      report.md, loss.png       run report
      k8s/                      rendered Kubernetes manifests (parallel=k8s)
      tensorboard/              TensorBoard event files (metrics.report_to=[tensorboard])
      mlflow_run.json           id and store of the run's MLflow run (metrics.report_to=[mlflow])
      export/model-f16.gguf     the merged model as GGUF (qlorax export; f16, bf16 or q8_0)
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")


@dataclass(frozen=True)
class RunPaths:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root).resolve())

    spec = property(lambda self: self.root / "spec.yaml")
    status = property(lambda self: self.root / "status.json")
    lock = property(lambda self: self.root / ".lock")
    inputs = property(lambda self: self.root / "inputs.json")
    log = property(lambda self: self.root / "train.log")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    train_summary = property(lambda self: self.root / "train_summary.json")
    data_cache = property(lambda self: self.root / "data_cache")
    checkpoints = property(lambda self: self.root / "checkpoints")
    merged = property(lambda self: self.root / "merged")
    merge_info = property(lambda self: self.root / "merged" / "merge_info.json")
    verify = property(lambda self: self.root / "verify.json")
    report = property(lambda self: self.root / "report.md")
    report_html = property(lambda self: self.root / "report.html")
    loss_plot = property(lambda self: self.root / "loss.png")
    k8s = property(lambda self: self.root / "k8s")
    tensorboard = property(lambda self: self.root / "tensorboard")
    mlflow_run = property(lambda self: self.root / "mlflow_run.json")
    export = property(lambda self: self.root / "export")

    def gguf(self, tensor_type: str) -> Path:
        """The exported GGUF file for one tensor type (f16, bf16, q8_0)."""
        return self.export / f"model-{tensor_type}.gguf"

    MERGE_STAGING_PREFIX = ".merged-"

    def merge_staging_dirs(self) -> list[Path]:
        """Merge staging directories (complete merges are renamed to merged/; any left belong to a killed merge)."""
        return sorted(self.root.glob(self.MERGE_STAGING_PREFIX + "*")) if self.root.is_dir() else []

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:06d}"

    def checkpoint_dirs(self) -> list[tuple[int, Path]]:
        """Completed checkpoint directories (temporary ones excluded), oldest first."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for child in self.checkpoints.iterdir():
            match = CHECKPOINT_RE.match(child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child))
        return sorted(found)


def read_json(path: Path) -> dict:
    """A run-directory JSON file, or {} when it is missing or cut short."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def run_dir_problem(path: str | Path) -> str:
    """'' when ``path`` is (or can be made) a writable run directory, else why not.

    Creates the directory (as the run would next) and writes a probe file in it, so read-only mounts,
    pseudo filesystems (/proc, /sys), a parent that is a file and a full disk are all caught here,
    before Hydra or a stage tries.
    """
    import errno
    import os
    import tempfile

    target = Path(path).expanduser()
    for parent in [target, *target.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = "it" if parent == target else f"its parent {parent}"
                return f"{what} is a file, not a directory"
            break
    try:
        target.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=target)
        try:
            os.write(fd, b"q")   # a full disk still creates empty files; a byte needs a block
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        reason = {errno.EROFS: "it is on a read-only filesystem", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied", errno.ENOSPC: "no space left on the device (nothing in it was changed); free some space",
                  errno.ENOENT: "it cannot be created there (a pseudo filesystem such as /proc?)"}.get(exc.errno)
        return reason or (exc.strerror or str(exc)).lower()
    return ""
