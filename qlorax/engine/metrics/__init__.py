"""Where logged training steps go: ``metrics.jsonl`` always, plus the sinks named in ``metrics.report_to``.

One small dispatch; each sink is its own module, imported (with its library) only when chosen:

    jsonl        run_dir/metrics.jsonl, one JSON object per logged step (always on: report.md and
                 `qlorax runs` read it)
    tensorboard  event files under run_dir/tensorboard/ (the ``tensorboard`` package)
    mlflow       one MLflow run per qlorax run, continued on resume (``mlflow`` or ``mlflow-skinny``)

Every sink has ``write(record)`` and ``close(outcome)``, outcome being finished / interrupted / failed.
Only rank 0 opens sinks; the other ranks get a writer that does nothing.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any

from qlorax.errors import QloraxError
from qlorax.paths import RunPaths
from qlorax.schema import RunSpec

log = logging.getLogger("qlorax")

# sink -> (module, library it imports, how to install that library)
SINKS: dict[str, tuple[str, str | None, str]] = {
    "jsonl": ("qlorax.engine.metrics.jsonl", None, ""),
    "tensorboard": ("qlorax.engine.metrics.tensorboard", "tensorboard", "pip install 'qlorax[tensorboard]'"),
    "mlflow": ("qlorax.engine.metrics.mlflow", "mlflow", "pip install 'qlorax[mlflow]' (or mlflow-skinny)"),
}
OUTCOMES = ("finished", "interrupted", "failed")


def missing_library(sink: str) -> str | None:
    """Why ``sink`` cannot run here (its library is not installed, and how to install it), or None
    (also for a name that is no sink: validation reports those as bad choices)."""
    _, library, install = SINKS.get(sink, ("", None, ""))
    if library is None or importlib.util.find_spec(library) is not None:
        return None
    return f"the {sink} sink needs the '{library}' package, which is not installed: {install}"


class Metrics:
    """The open sinks of one training run; rank 0 holds the real ones, other ranks none."""

    def __init__(self, sinks: list[Any]):
        self.sinks = sinks

    def write(self, record: dict[str, Any]) -> None:
        """Send one logged step (``step`` plus numbers) to every sink."""
        for sink in self.sinks:
            sink.write(record)

    def close(self, outcome: str = "finished") -> None:
        """Flush and close every sink, recording how the run ended (finished / interrupted / failed)."""
        for sink in self.sinks:
            try:
                sink.close(outcome)
            except Exception as exc:   # one sink failing to close must not hide the others or the run's own error
                log.warning("metrics: closing %s failed: %s", type(sink).__name__, exc)


def open_metrics(spec: RunSpec, paths: RunPaths, start_step: int, enabled: bool = True) -> Metrics:
    """Open metrics.jsonl and every sink of ``metrics.report_to``; ``start_step`` > 0 when resuming."""
    if not enabled:
        return Metrics([])
    sinks = []
    for name in ("jsonl", *dict.fromkeys(spec.metrics.report_to)):
        problem = missing_library(name)
        if problem:   # validation catches this; a worker in another environment (a pod's image) may still meet it
            for sink in sinks:
                sink.close("failed")
            raise QloraxError(f"metrics.report_to: {problem}, or drop {name} from metrics.report_to")
        module = importlib.import_module(SINKS[name][0])
        try:
            sinks.append(module.open_sink(spec, paths, start_step))
        except Exception as exc:   # e.g. an MLflow store that refuses or cannot be reached: say which sink, no traceback
            for sink in sinks:
                sink.close("failed")
            raise QloraxError(f"metrics.report_to: could not open the {name} sink: {exc}") from exc
    if len(sinks) > 1:
        log.info("metrics: %s", ", ".join(sink.where for sink in sinks))
    return Metrics(sinks)
