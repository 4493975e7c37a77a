"""The one module that knows where every artifact lives in a run directory.

    run_dir/
      spec.yaml                 resolved run spec (the only file crossing process/pod boundaries)
      status.json               state of the last stage: running / finished / failed / interrupted
      train.log                 console log of rank 0
      metrics.jsonl             one JSON object per logged step (step, loss, learning_rate, epoch, ...)
      train_summary.json        totals of the train stage: steps, losses, tokens/s, memory, weight bytes
      data_cache/               tokenized data, keyed by data spec and tokenizer
      checkpoints/step-000100/  adapter (peft format) + trainer_state.pt + manifest.json
      merged/                   merged model in plain Hugging Face format (+ merge_info.json)
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
