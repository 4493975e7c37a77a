"""MLflow sink: one MLflow run per qlorax run, its id kept in run_dir/mlflow_run.json so a resume continues it.

The tracking store is ``metrics.mlflow_tracking_uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's own
default; any store the installed MLflow supports works (a local ``file:`` folder or ``sqlite:`` database,
a tracking server). Uses ``MlflowClient`` rather than the global ``mlflow.start_run`` state, so nothing
leaks into the caller's MLflow session.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

from qlorax.engine.metrics.tensorboard import numeric
from qlorax.paths import RunPaths, read_json
from qlorax.schema import RunSpec
from qlorax.specfile import to_dict

STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}
PARAM_SECTIONS = ("model", "quant", "data", "lora", "train")
MAX_PARAM_CHARS = 500   # MLflow rejects longer parameter values


class MlflowSink:
    def __init__(self, client, run_id: str, where: str):
        self.client, self.run_id, self.where = client, run_id, where

    def write(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, record["step"])
                                                    for k, v in numeric(record).items()])

    def close(self, outcome: str) -> None:
        self.client.set_terminated(self.run_id, status=STATUS.get(outcome, "FAILED"))


def open_sink(spec: RunSpec, paths: RunPaths, start_step: int) -> MlflowSink:
    """Continue the run's MLflow run when resuming in the same store; otherwise create one and log the spec as params."""
    import mlflow
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    uri = spec.metrics.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    previous = read_json(paths.mlflow_run)
    if start_step and previous.get("tracking_uri") == uri and _exists(client, previous.get("run_id")):
        run_id = previous["run_id"]
        client.update_run(run_id, status="RUNNING")
    else:
        experiment = client.get_experiment_by_name(spec.metrics.mlflow_experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else client.create_experiment(spec.metrics.mlflow_experiment))
        run_id = client.create_run(experiment_id, run_name=paths.root.name,
                                   tags={"qlorax.run_dir": str(paths.root)}).info.run_id
        params = [Param(key, str(value)[:MAX_PARAM_CHARS]) for key, value in _params(spec).items()]
        for i in range(0, len(params), 100):   # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=params[i:i + 100])
        tmp = paths.mlflow_run.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run_id": run_id, "experiment": spec.metrics.mlflow_experiment, "tracking_uri": uri}))
        os.replace(tmp, paths.mlflow_run)
    return MlflowSink(client, run_id, f"MLflow run {run_id} in {uri}")


def _exists(client, run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        client.get_run(run_id)
        return True
    except Exception:   # deleted, or another store: start a fresh run
        return False


def _params(spec: RunSpec) -> dict[str, Any]:
    full = to_dict(spec)
    return {f"{section}.{key}": value for section in PARAM_SECTIONS for key, value in full[section].items()}
