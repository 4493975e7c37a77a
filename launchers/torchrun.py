"""Multi-process launcher on one node: builds torchrun's arguments and runs it.

torchrun starts ``workers`` ranks of ``python -m qlorax.launchers.worker``, watches them,
and stops every rank when one fails; each rank reads spec.yaml and pins itself to its cores.
We only add what torchrun does not: a free port, per-rank log files, and an error that
names the failed rank with its last log lines.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from qlorax.errors import Interrupted, QloraxError
from qlorax.launchers import LaunchResult
from qlorax.launchers.pinning import format_plans, rank_plans
from qlorax.paths import RunPaths
from qlorax.schema import RunSpec


def free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def check_port(addr: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
        except OSError as exc:
            raise QloraxError(f"parallel.master_port: {addr}:{port} is already in use ({exc.strerror}); "
                              "pick another with parallel.master_port=<port> or parallel.master_port=0 for a free one") from None


def torchrun_command(spec: RunSpec, port: int, stages: str = "train") -> list[str]:
    """The exact torchrun invocation for this spec."""
    par = spec.parallel
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={spec.workers}",
            f"--master-addr={par.master_addr}", f"--master-port={port}", "--max-restarts=0",
            f"--monitor-interval={par.monitor_interval_s:g}", "-m", "qlorax.launchers.worker",
            "--run-dir", str(spec.run_dir), "--stages", stages]


def describe(spec: RunSpec) -> list[str]:
    from qlorax.engine.distributed import choose_backend

    port = spec.parallel.master_port or "<free port>"
    cmd = " ".join(str(c) for c in torchrun_command(spec, port))   # type: ignore[arg-type]
    try:
        backend, reason = choose_backend(spec.parallel.backend)
    except QloraxError as exc:
        backend, reason = "unavailable", str(exc)
    return ([f"launcher: torchrun, {spec.workers} ranks on this node, backend {backend} ({reason})", f"command: {cmd}"]
            + format_plans(rank_plans(spec)))


def launch(spec: RunSpec) -> LaunchResult:
    par = spec.parallel
    if par.master_port:
        check_port(par.master_addr, par.master_port)
    port = par.master_port or free_port(par.master_addr)
    paths = RunPaths(spec.run_dir)
    logs = paths.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # Each rank sets its own thread count and affinity; this only stops torchrun defaulting to 1.
    threads = str(rank_plans(spec)[0].threads)
    env = dict(os.environ, QLORAX_RANK_LOG_DIR=str(logs), PYTHONUNBUFFERED="1", OMP_NUM_THREADS=threads)
    process = subprocess.Popen(torchrun_command(spec, port), env=env, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    torchrun_err = []
    interrupted = False
    try:
        for line in process.stderr:    # pass rank 0's log through; keep torchrun's report
            torchrun_err.append(line)
            if not _is_torchrun_noise(line):
                sys.stderr.write(line)
        rc = process.wait()
    except KeyboardInterrupt:
        interrupted = True
        os.killpg(process.pid, signal.SIGINT)   # ranks save a checkpoint at the step boundary
        rc = process.wait()
    finally:
        _kill_group(process.pid)
    if rc == 0:
        return LaunchResult(ok=True, message=f"{spec.workers} ranks finished")
    if interrupted:
        raise Interrupted(f"interrupted: the ranks stopped at a step boundary after saving a checkpoint; continue with "
                          f"`qlorax train run_dir={paths.root} resume=auto`")
    rank = _failed_rank("".join(torchrun_err))
    raise QloraxError(_failure_message(rank, rc, logs))


def _kill_group(pgid: int) -> None:
    """No orphans: whatever torchrun left in its session goes too."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _is_torchrun_noise(line: str) -> bool:
    return line.startswith(("W", "E", "I")) and re.match(r"^[WEI]\d{4} ", line) is not None


def _failed_rank(report: str) -> int | None:
    found = re.findall(r"\brank\s*:\s*(\d+)", report)
    return int(found[0]) if found else None


def _failure_message(rank: int | None, rc: int, logs: Path) -> str:
    if rank is None:
        return f"multi-process training failed (torchrun exit code {rc}); see the rank logs in {logs}"
    log_file = logs / f"rank-{rank}.log"
    tail = log_file.read_text().splitlines()[-10:] if log_file.is_file() else ["(no log written)"]
    body = "\n".join(f"    {line}" for line in tail)
    return (f"rank {rank} failed; the whole job was stopped (torchrun exit code {rc}). "
            f"Last lines of {log_file}:\n{body}")
