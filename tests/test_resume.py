"""A run killed at any moment resumes from its last checkpoint and ends bit-identical."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, asset

pytestmark = pytest.mark.integration
STEPS = 24


def _args(run_dir: Path, model: Path, data: Path) -> list[str]:
    return [sys.executable, "-m", "qlorax", "train", "model=stories260k", f"model.path={model}", "data=english_quotes",
            f"data.path={data}", "data.cutoff_len=64", f"train.max_steps={STEPS}", "train.save_steps=3",
            "train.logging_steps=1", "train.eval_steps=8", "train.save_total_limit=2", f"run_dir={run_dir}", "quiet=true"]


def _steps_logged(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def _run_until_killed(args: list[str], run_dir: Path, kill_at: int, env=None) -> int:
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if _steps_logged(run_dir) >= kill_at:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    return proc.returncode


def _adapter(run_dir: Path) -> bytes:
    return (run_dir / "checkpoints" / f"step-{STEPS:06d}" / "adapter_model.safetensors").read_bytes()


def test_sigkill_at_random_steps_and_during_a_checkpoint_write(tmp_path):
    model, data = asset("models/stories260K-hf"), asset("data/english_quotes.jsonl")
    reference = tmp_path / "uninterrupted"
    subprocess.run(_args(reference, model, data), cwd=REPO, check=True, capture_output=True)

    run = tmp_path / "killed"
    args = _args(run, model, data)
    # Once inside the checkpoint write of step 6 (adapter written, manifest not yet) ...
    env = dict(os.environ, QLORAX_TEST_KILL_IN_CHECKPOINT="6")
    assert subprocess.run(args, cwd=REPO, env=env, capture_output=True).returncode == -signal.SIGKILL
    assert list((run / "checkpoints").glob(".tmp-step-000006-*")), "the kill should leave a half-written checkpoint"
    # ... then at random steps.
    for kill_at in sorted(random.Random(7).sample(range(7, STEPS - 1), 3)):
        rc = _run_until_killed(args, run, kill_at)
        assert rc in (-signal.SIGKILL, 0)
    final = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    assert "resumed from" in final.stderr
    assert _adapter(run) == _adapter(reference)
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), "metrics.jsonl must hold each step once after resumes"
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_sigterm_saves_and_says_how_to_resume(tmp_path):
    model, data = asset("models/stories260K-hf"), asset("data/english_quotes.jsonl")
    run = tmp_path / "term"
    args = _args(run, model, data)
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while _steps_logged(run) < 4 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode not in (0, None)
    assert "SIGTERM: stopped at step" in err and "resume=auto" in err and "Traceback" not in err
    stopped_at = int(err.split("stopped at step ")[1].split()[0])
    assert (run / "checkpoints" / f"step-{stopped_at:06d}" / "manifest.json").is_file()
    assert '"state": "interrupted"' in (run / "status.json").read_text()
