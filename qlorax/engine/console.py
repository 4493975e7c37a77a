"""What a person watching a run sees: log lines, the progress bar, and metrics files.

On a terminal (and unless ``quiet``) a rich progress bar shows step, loss, learning rate,
tokens/s, ETA and RSS. Otherwise (CI, pipes, pods) only plain lines are written, with no
control characters. Metrics files are ``qlorax.engine.metrics``' business. Either way the reference's ``{'loss': ..., 'learning_rate': ..., 'epoch': ...}``
line is printed every ``logging_steps``.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("qlorax")


def setup_logging(log_file: Path | None = None, rank: int = 0, quiet: bool = False) -> None:
    """Plain 'message' lines on stderr (rank 0; others only warnings) and in the run's log file."""
    logging.raiseExceptions = False   # a full disk ends in one clear error, not a logging traceback per line
    root = logging.getLogger("qlorax")
    root.handlers.clear()
    root.setLevel(logging.INFO)
    root.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    prefix = "" if rank == 0 else f"[rank {rank}] "
    console.setFormatter(logging.Formatter(prefix + "%(message)s"))
    root.addHandler(console)
    if log_file is not None and rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(handler)
    rank_logs = os.environ.get("QLORAX_RANK_LOG_DIR")   # set by the multi-process launcher
    if rank_logs:
        per_rank = logging.FileHandler(Path(rank_logs) / f"rank-{rank}.log")
        per_rank.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(per_rank)
    for noisy in ("transformers", "peft", "bitsandbytes", "accelerate", "gguf"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:   # weight-loading bars are noise in logs; our own progress bar is the one to watch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reference_line(loss: float, learning_rate: float, epoch: float) -> str:
    """The line the reference recipe's users know from the HF Trainer."""
    return str({"loss": round(loss, 4), "learning_rate": float(f"{learning_rate:.6g}"), "epoch": round(epoch, 2)})


class Progress:
    """A rich progress bar on a terminal; nothing (plain log lines only) elsewhere."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start_step = total, start
        self.started = time.perf_counter()
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = RichProgress(TextColumn("step {task.completed}/{task.total}"), BarColumn(bar_width=20),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn(), transient=False)
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, completed=start, info="")

    @property
    def live(self) -> bool:
        """True while a progress bar is drawn (a terminal, not quiet)."""
        return self._bar is not None

    def update(self, step: int, info: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)

    def print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)

    def eta_s(self, step: int) -> float:
        done = step - self.start_step
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self.started) / done * (self.total - step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
