"""One qlorax process at a time per run directory: train, run, merge and verify hold ``run_dir/.lock``.

The lock is an ``flock`` on that file, so the kernel drops it when its holder dies, SIGKILL
included: a lock left by a killed process is free again and the next command takes it over
(saying whose it was). The file also records the holder's pid, host, command and start time,
which the refusal names. flock works across hosts on NFSv4 volumes as well.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Iterator

from qlorax.errors import QloraxError
from qlorax.paths import RunPaths

log = logging.getLogger("qlorax")


class RunDirBusy(QloraxError):
    """Another qlorax process works in this run directory."""


def _alive(record: dict) -> bool:
    if record.get("host") != os.uname().nodename:
        return True   # cannot tell from here
    try:
        os.kill(int(record.get("pid", 0)), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def _describe(record: dict) -> str:
    return (f"`qlorax {record.get('command', '?')}` (pid {record.get('pid', '?')} on host {record.get('host', '?')}, "
            f"since {record.get('since', '?')})")


@contextlib.contextmanager
def hold(paths: RunPaths, command: str) -> Iterator[None]:
    """Hold the run directory's lock for the block; refuse at once when another process holds it."""
    import fcntl

    paths.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            raise RunDirBusy(f"run_dir {paths.root} is in use by {_describe(holder)}: wait for it to finish, "
                             f"stop it (kill {holder.get('pid', '<pid>')}), or use another run_dir") from None
        previous = _read(fd)
        if previous.get("pid") and not _alive(previous):
            log.warning("run_dir: taking over the lock of %s, which is no longer running (killed?)",
                        _describe(previous))
        record = {"pid": os.getpid(), "host": os.uname().nodename, "command": command,
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with contextlib.suppress(OSError):   # a full disk: the flock alone still excludes
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)   # an empty lock file: nobody holds it
    finally:
        os.close(fd)   # releases the flock


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
