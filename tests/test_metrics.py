"""Metric sinks against the real libraries: TensorBoard event files read back with TensorBoard's
EventAccumulator, an MLflow run read back with the MLflow client (MLflow's default sqlite store)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

from qlorax.errors import ConfigError


def test_a_sink_whose_library_is_missing_is_a_config_error_with_the_install_command(monkeypatch):
    from qlorax.engine import metrics
    from qlorax.spec import compose

    module, _, install = metrics.SINKS["tensorboard"]
    monkeypatch.setitem(metrics.SINKS, "tensorboard", (module, "qlorax_no_such_library", install))
    with pytest.raises(ConfigError) as err:
        compose(["metrics.report_to=[tensorboard,mlflow]"])
    text = str(err.value)
    assert "metrics.report_to" in text and "pip install 'qlorax[tensorboard]'" in text
    assert "fix: metrics.report_to=[mlflow]" in text


def test_a_misspelt_sink_is_named_with_the_closest_one():
    from qlorax.spec import compose

    with pytest.raises(ConfigError) as err:
        compose(["metrics.report_to=[tensorbord]"])
    assert "'tensorbord' is not one of tensorboard, mlflow" in str(err.value)
    assert "fix: metrics.report_to=[tensorboard]" in str(err.value)


def test_a_store_mlflow_refuses_is_a_clear_error_naming_the_sink(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from qlorax.engine.metrics import open_metrics
    from qlorax.errors import QloraxError
    from qlorax.paths import RunPaths
    from qlorax.spec import compose

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)   # MLflow 3.x refuses file: stores without it
    spec = compose(["metrics.report_to=[mlflow]", f"metrics.mlflow_tracking_uri=file://{tmp_path / 'mlruns'}"])
    with pytest.raises(QloraxError, match="could not open the mlflow sink: .*sqlite"):
        open_metrics(spec, RunPaths(tmp_path / "run"), 0)


def _logged(run_dir) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.integration
def test_tensorboard_and_mlflow_hold_every_logged_step_across_an_interrupt_and_resume(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, store = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [sys.executable, "-m", "qlorax", "train", f"run_dir={run_dir}", "train.max_steps=10",
            "train.logging_steps=1", "train.save_steps=100", "train.eval_steps=5", "quiet=true",
            "metrics.report_to=[tensorboard,mlflow]", "metrics.mlflow_experiment=qlorax-test"]
    env = {"MLFLOW_TRACKING_URI": store}
    import os

    env = dict(os.environ, **env)
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while len(_logged(run_dir)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert "stopped at step" in err, err[-3000:]
    client = MlflowClient(tracking_uri=store)
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"   # the sink was closed on the interrupt

    resumed = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = _logged(run_dir)
    assert [r["step"] for r in records] == list(range(1, 11))

    run = client.get_run(run_id)   # the resume continued the same MLflow run
    assert run.info.status == "FINISHED" and json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run_id
    assert run.data.params["lora.r"] == "8" and run.data.tags["qlorax.run_dir"] == str(run_dir.resolve())
    mlflow_loss = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    mlflow_eval = {m.step: m.value for m in client.get_metric_history(run_id, "eval_loss")}

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tb_loss = {e.step: e.value for e in events.Scalars("loss")}
    assert len(events.Scalars("loss")) == len(records), "each step once in TensorBoard after the resume"
    for r in records:
        assert mlflow_loss[r["step"]] == pytest.approx(r["loss"], rel=1e-12)
        assert tb_loss[r["step"]] == pytest.approx(r["loss"], rel=1e-6)   # TensorBoard stores float32
    assert sorted(mlflow_eval) == [r["step"] for r in records if "eval_loss" in r] == [5, 10]
