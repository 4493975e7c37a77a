"""TensorBoard sink: scalar event files under run_dir/tensorboard/ (``tensorboard --logdir`` reads them)."""
from __future__ import annotations

from typing import Any

from qlorax.paths import RunPaths
from qlorax.schema import RunSpec


class TensorBoardSink:
    def __init__(self, writer, where: str):
        self.writer = writer
        self.where = where

    def write(self, record: dict[str, Any]) -> None:
        for key, value in numeric(record).items():
            self.writer.add_scalar(key, value, record["step"])

    def close(self, outcome: str) -> None:
        self.writer.flush()
        self.writer.close()


def open_sink(spec: RunSpec, paths: RunPaths, start_step: int) -> TensorBoardSink:
    """A SummaryWriter on run_dir/tensorboard; on resume, events past the checkpoint are purged (they are redone)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(paths.tensorboard), purge_step=start_step + 1 if start_step else None)
    return TensorBoardSink(writer, f"TensorBoard events in {paths.tensorboard}")


def numeric(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers (bools and the step itself excluded): what scalar sinks plot."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
