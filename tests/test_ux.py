"""What users see: `qlorax runs` statuses, Hydra sweeps, quiet logs, the run report."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_cli

pytestmark = pytest.mark.integration
FAST = ["train.logging_steps=1", "train.save_steps=2", "quiet=true"]


def test_runs_shows_finished_killed_and_failed(tmp_path):
    root = tmp_path / "outputs"
    done = run_cli("train", *FAST, "train.max_steps=4", f"run_dir={root / 'finished'}")
    assert done.returncode == 0, done.stderr[-2000:]

    killed = root / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "qlorax", "train", *FAST, "train.max_steps=100000",
                             f"run_dir={killed}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((killed / "checkpoints").glob("step-*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    failed = run_cli("train", *FAST, "train.max_steps=4", "lora.target_modules=[no_such_proj]",
                     f"run_dir={root / 'failed'}")
    assert failed.returncode == 2 and "lora.target_modules" in failed.stderr and "q_proj" in failed.stderr

    listing = run_cli("runs", str(root))
    assert listing.returncode == 0, listing.stderr
    lines = {name: next(l for l in listing.stdout.splitlines() if f"/{name} " in l or l.rstrip().endswith(f"/{name}")
                        or f"/{name}│" in l or f"/{name} │" in l) for name in ("finished", "killed", "failed")}
    assert "finished" in lines["finished"] and "4/4" in lines["finished"]
    assert "killed, resumable" in lines["killed"]
    assert "failed" in lines["failed"] and "resumable" not in lines["failed"]
    status = json.loads((root / "failed" / "status.json").read_text())
    assert status["state"] == "failed" and "target_modules" in status["error"]


def test_multirun_sweep_makes_one_run_directory_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("train", "-m", "lora.r=4,8", "train.max_steps=2", "quiet=true", f"run_dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = {}
    for job in ("0", "1"):
        spec_text = (sweep / job / "spec.yaml").read_text()
        ranks[job] = next(l for l in spec_text.splitlines() if l.strip().startswith("r: "))
        assert (sweep / job / "checkpoints" / "step-000002" / "adapter_config.json").is_file()
    assert sorted(ranks.values()) == ["  r: 4", "  r: 8"]


def test_quiet_non_tty_log_is_plain(tmp_path):
    result = run_cli("train", "train.max_steps=3", "train.logging_steps=1", f"run_dir={tmp_path / 'r'}")
    assert result.returncode == 0
    output = result.stdout + result.stderr
    assert "\x1b" not in output and "\r" not in output
    assert output.count("{'loss': ") == 3 and "eta" in output and "tok/s" in output
