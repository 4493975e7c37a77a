"""Multi-process training on one node over gloo: equivalence, failure handling, other launchers' env."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, assert_user_error, run_cli

pytestmark = pytest.mark.integration
COMMON = ["data.cutoff_len=64", "train.max_steps=8", "train.batch_size=4", "train.micro_batch_size=2",
          "train.logging_steps=1", "train.save_steps=4", "lora.dropout=0", "quiet=true"]


def _adapter_tensors(run_dir: Path, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / f"step-{step:06d}" / "adapter_model.safetensors"))


def test_two_gloo_ranks_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    single = run_cli("train", *COMMON, f"run_dir={one}")
    assert single.returncode == 0, single.stderr[-2000:]
    double = run_cli("train", "parallel=ccl", "workers=2", *COMMON, f"run_dir={two}")
    assert double.returncode == 0, double.stderr[-3000:]
    assert "2 ranks over gloo" in double.stderr and "not installed" in double.stderr   # says which backend and why
    a, b = _adapter_tensors(one, 8), _adapter_tensors(two, 8)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(a[k].abs().max()) for k in a)
    assert worst < 0.02 * scale, (worst, scale)
    summary = json.loads((two / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["rank_adapter_max_diff"] == 0.0   # both ranks identical
    # Same run directory layout as a single-process run; rank 0 alone wrote it.
    files = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if ".hydra" not in p.parts
                             and "logs" not in p.parts and "data_cache" not in p.parts)
    assert files(one) == files(two)
    assert sorted(p.name for p in (two / "logs").iterdir()) == ["rank-0.log", "rank-1.log"]
    loss_one = [json.loads(l)["loss"] for l in (one / "metrics.jsonl").read_text().splitlines()]
    loss_two = [json.loads(l)["loss"] for l in (two / "metrics.jsonl").read_text().splitlines()]
    assert max(abs(x - y) for x, y in zip(loss_one, loss_two)) < 0.02


def _descendants_alive(marker: str) -> list[int]:
    import psutil

    alive = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []):
                alive.append(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return alive


def _start_two_ranks(run_dir: Path, *extra: str) -> subprocess.Popen:
    """A two-rank training run through the CLI, returned once it has logged three steps."""
    args = [sys.executable, "-m", "qlorax", "train", "parallel=ccl", "workers=2", *COMMON, "train.max_steps=100000",
            *extra, f"run_dir={run_dir}"]
    # as a terminal starts a foreground command: with SIGINT at its default. A shell starts background jobs with
    # SIGINT ignored, children inherit that, and Python leaves an ignored SIGINT ignored, so under a backgrounded
    # test run the CLI would never see the Ctrl-C below (it trained on until the test timed out).
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 180
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    return proc


def _rank_process(proc: subprocess.Popen, rank: int):
    """The one worker process of ``rank`` under the CLI process ``proc``."""
    import psutil

    found = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "qlorax.launchers.worker" in " ".join(p.cmdline()) and p.environ().get("RANK") == str(rank)]
    assert len(found) == 1, found
    return found[0]


def test_killing_one_rank_stops_the_job_quickly_with_no_orphans(tmp_path):
    run_dir = tmp_path / "dies"
    proc = _start_two_ranks(run_dir)
    victim = _rank_process(proc, 1)
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    elapsed = time.monotonic() - killed_at
    assert proc.returncode != 0
    assert elapsed < 30, f"job took {elapsed:.1f}s to stop"
    assert "rank 1 failed" in err and "rank-1.log" in err and "Traceback" not in err.split("rank 1 failed")[-1][:200]
    time.sleep(0.5)
    assert _descendants_alive(str(run_dir)) == [], "processes left behind"


def test_the_rank_that_failed_first_is_named_not_the_one_that_lost_it():
    """torchrun's report (built by torch's own formatter) can put a rank that only lost its peer first."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from qlorax.errors import PeerLost
    from qlorax.launchers.torchrun import _root_cause

    def report(failures):   # same second, so torchrun's "root cause" is the lowest local rank
        failed = {rank: ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="/nonexistent")
                  for rank, code in failures}
        for failure in failed.values():
            failure.timestamp = 0
        return ChildFailedError("qlorax.launchers.worker", failed).format_msg()

    assert _root_cause(report([(0, PeerLost.exit_code), (1, -9)])) == (1, -9)
    assert _root_cause(report([(0, PeerLost.exit_code), (1, PeerLost.exit_code), (2, 2)])) == (2, 2)
    assert _root_cause(report([(0, 1), (1, -9)])) == (0, 1)          # a real failure on rank 0 stays the cause
    assert _root_cause(report([(0, PeerLost.exit_code)])) == (0, PeerLost.exit_code)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_worker_runs_under_mpi_style_environment(tmp_path):
    """Ranks started by mpirun (Intel MPI sets PMI_RANK/PMI_SIZE) read spec.yaml and train together."""
    from qlorax.spec import compose
    from qlorax.specfile import save_spec

    run_dir = tmp_path / "mpi"
    spec = compose(["parallel=ccl", "workers=2", *COMMON, f"run_dir={run_dir}"])
    save_spec(spec, run_dir / "spec.yaml")
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(PMI_RANK=str(rank), PMI_SIZE="2", MPI_LOCALRANKID=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "qlorax.launchers.worker", "--run-dir", str(run_dir)],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["rank_adapter_max_diff"] == 0.0


def test_preflight_fails_fast_when_a_rank_never_arrives(tmp_path):
    from qlorax.spec import compose
    from qlorax.specfile import save_spec

    run_dir = tmp_path / "alone"
    spec = compose(["parallel=ccl", "workers=2", *COMMON, f"run_dir={run_dir}", "parallel.preflight_timeout_s=3"])
    save_spec(spec, run_dir / "spec.yaml")
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "qlorax.launchers.worker", "--run-dir", str(run_dir)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "pre-flight" in result.stderr and "MASTER_ADDR" in result.stderr
    assert time.monotonic() - started < 30


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = run_cli("train", "parallel=ccl", "workers=2", *COMMON, f"parallel.master_port={port}",
                         f"run_dir={tmp_path / 'r'}")
    assert_user_error(result, f"127.0.0.1:{port} is already in use", "parallel.master_port=0")


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """SIGTERM reaches one rank (a pod eviction, a kill): the ranks agree on the stop, save once, and resume."""
    run_dir = tmp_path / "one_signalled"
    proc = _start_two_ranks(run_dir, "train.save_steps=1000")
    _rank_process(proc, 1).send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "resume=auto" in err and "Traceback" not in err
    saved = sorted(run_dir.glob("checkpoints/step-*/manifest.json"))
    assert len(saved) == 1, "one checkpoint, at the step both ranks stopped after"
    logs = {r: (run_dir / "logs" / f"rank-{r}.log").read_text() for r in (0, 1)}
    assert "SIGTERM: stopped at step" in logs[1] and "a signal to another rank: stopped at step" in logs[0]
    stopped = {r: int(logs[r].split("stopped at step ")[1].split()[0]) for r in (0, 1)}
    assert stopped[0] == stopped[1] == int(saved[0].parent.name.split("-")[1])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_all_ranks_at_a_checkpoint(tmp_path, sig):
    """Ctrl-C (SIGINT to the foreground process) or SIGTERM (kill, a scheduler) to the launcher, not to a rank."""
    run_dir = tmp_path / "interrupted"
    proc = _start_two_ranks(run_dir)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "resume=auto" in err and "Traceback" not in err
    assert sorted(run_dir.glob("checkpoints/step-*/manifest.json")), "the ranks should save before stopping"
    time.sleep(0.5)
    assert _descendants_alive(str(run_dir)) == []
