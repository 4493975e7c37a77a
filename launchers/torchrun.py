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
import threading
from pathlib import Path

from qlorax.errors import InternalError, Interrupted, PeerLost, QloraxError
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
    interrupted = in_report = False
    # SIGTERM (kill, systemd, a batch scheduler) stops the ranks as Ctrl-C does: its default would end this process
    # alone, and the ranks, in sessions of their own, would train on until a write to the closed pipe killed them
    main_thread = threading.current_thread() is threading.main_thread()   # where Python runs signal handlers
    previous_sigterm = signal.signal(signal.SIGTERM, _stop_on_sigterm) if main_thread else None
    try:
        for line in process.stderr:    # pass rank 0's log through; keep torchrun's report for torchrun.log
            torchrun_err.append(line)
            # torchrun ends a failed job with its own traceback and report: summarized below, kept in the file
            in_report = in_report or line.startswith("Traceback (most recent call last)")
            if not in_report and not _is_torchrun_noise(line):
                sys.stderr.write(line)
        rc = process.wait()
    except (KeyboardInterrupt, _Terminated) as stop:
        interrupted = True
        # torchrun passes the signal on to the ranks, which save a checkpoint at the step boundary
        os.killpg(process.pid, signal.SIGTERM if isinstance(stop, _Terminated) else signal.SIGINT)
        # keep reading: torchrun and the ranks report the stop on stderr, and a full pipe nobody reads would
        # block them before they exit (and this wait with them)
        torchrun_err.extend(process.stderr)
        rc = process.wait()
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)
        _kill_group(process.pid)
    if rc == 0:
        return LaunchResult(ok=True, message=f"{spec.workers} ranks finished")
    if interrupted:
        raise Interrupted(f"interrupted: the ranks stopped at a step boundary after saving a checkpoint; continue with "
                          f"`qlorax train run_dir={paths.root} resume=auto`")
    report = "".join(torchrun_err)
    (logs / "torchrun.log").write_text(report)
    rank, rank_rc = _root_cause(report)
    if rank_rc == Interrupted.exit_code:   # a rank was signalled alone (SIGTERM to one process): all stopped together
        raise Interrupted(f"rank {rank} was stopped by a signal; every rank stopped after the same step and saved a "
                          f"checkpoint; continue with `qlorax train run_dir={paths.root} resume=auto`")
    message = _failure_message(rank, rank_rc, rc, logs)
    raise QloraxError(message) if rank_rc == QloraxError.exit_code else InternalError(message)


class _Terminated(Exception):
    """SIGTERM reached the launcher."""


def _stop_on_sigterm(signum, frame):
    raise _Terminated()


def _kill_group(pgid: int) -> None:
    """No orphans: whatever torchrun left in its session goes too, and its ranks, which torchrun starts in sessions
    of their own (a second Ctrl-C while the ranks save, or a launcher error, ends here with torchrun still up)."""
    import psutil

    try:
        ranks = psutil.Process(pgid).children(recursive=True)
    except psutil.Error:
        ranks = []
    for pid in [pgid, *(p.pid for p in ranks)]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _is_torchrun_noise(line: str) -> bool:
    return line.startswith(("W", "E", "I")) and re.match(r"^[WEI]\d{4} ", line) is not None


def _root_cause(report: str) -> tuple[int | None, int | None]:
    """(rank, exit code) of the rank that failed first.

    torchrun lists every rank it found failed at one poll and calls the earliest its root cause; ranks
    that died within the same second tie, and a rank that only lost its peer (PeerLost's exit code)
    can be listed first. The first listed failure that is not such a rank is the cause.
    """
    others, _, root = report.partition("Root Cause")
    ordered = _failures(root) + _failures(others)
    for rank, code in ordered:
        if code != PeerLost.exit_code:
            return rank, code
    return ordered[0] if ordered else (None, None)


def _failures(text: str) -> list[tuple[int, int | None]]:
    """(rank, exit code) of each failure entry in (a part of) torchrun's report, in order."""
    found = []
    for entry in re.split(r"\n\[\d+\]:\n", text)[1:]:
        rank = re.search(r"\brank\s*:\s*(\d+)", entry)
        code = re.search(r"\bexitcode\s*:\s*(-?\d+)", entry)
        if rank:
            found.append((int(rank.group(1)), int(code.group(1)) if code else None))
    return found


def _without_tracebacks(lines: list[str]) -> list[str]:
    """Log lines with each traceback's frames dropped (its last line, the exception, stays)."""
    kept, inside = [], False
    for line in lines:
        if line.startswith("Traceback (most recent call last)"):
            inside = True
        elif inside and not line.startswith((" ", "\t")):
            inside = False
        if not inside:
            kept.append(line)
    return kept


def _failure_message(rank: int | None, rank_rc: int | None, rc: int, logs: Path) -> str:
    if rank is None:
        return (f"multi-process training failed (torchrun exit code {rc}); see the rank logs in {logs} "
                f"and torchrun's report in {logs / 'torchrun.log'}")
    log_file = logs / f"rank-{rank}.log"
    tail = _without_tracebacks(log_file.read_text().splitlines())[-10:] if log_file.is_file() else ["(no log written)"]
    body = "\n".join(f"    {line}" for line in tail)
    if rank_rc is not None and rank_rc < 0:
        how = f"killed by signal {-rank_rc} ({signal.Signals(-rank_rc).name}; SIGKILL is often the out-of-memory killer)"
    else:
        how = {1: "with an internal error", 2: "on bad input", PeerLost.exit_code: "after losing its connection to another rank"
               }.get(rank_rc, f"with exit code {rank_rc}")
    return (f"rank {rank} failed {how}; the whole job was stopped (torchrun exit code {rc}). "
            f"Last lines of {log_file}:\n{body}")
