"""User-facing errors: printed as a message (no traceback) and mapped to exit codes."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class QloraxError(Exception):
    """A problem the user can fix; the message says how. Exit code 2."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the configuration, and the override that fixes it."""

    key: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        text = f"{self.key}: {self.message}"
        return f"{text}\n      fix: {self.fix}" if self.fix else text


class ConfigError(QloraxError):
    """Every problem found in a configuration, reported together."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        lines = [f"invalid configuration ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class StageInputMissing(QloraxError):
    """A stage's input artifact is absent; the message names the command that writes it."""


class Interrupted(QloraxError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""

    exit_code = 130


# How a full disk shows up: OSError 28 from Python, the os error inside Rust (safetensors) and C++ (torch.save) messages.
_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "basic_ios::clear",
                   "file write failed")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that failed for lack of space (from Python, torch or safetensors)."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(t in str(exc) for t in _DISK_FULL_TEXT)


class InternalError(QloraxError):
    """A failure that is not the user's input (a bug, a broken install): exit code 1, traceback in the log."""

    exit_code = 1


class PeerLost(QloraxError):
    """This rank stopped because another rank went away mid-collective: the other rank holds the cause.

    Its own exit code lets a launcher that sees several ranks fail name the one that failed first.
    """

    exit_code = 3


def record_unexpected(exc: BaseException, where: str, log_file: Path | None) -> str:
    """Append ``exc``'s full traceback to ``log_file`` (else a file in the temp folder); return one console line.

    The console gets what failed and where the details are, never the traceback itself.
    """
    import tempfile
    import time
    import traceback

    if log_file is None:
        log_file = Path(tempfile.gettempdir()) / f"qlorax-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR unexpected error in {where}:\n{text}")
        details = f"the full traceback is in {log_file}"
    except OSError as write_error:   # e.g. disk full: still no traceback on the console
        details = f"the traceback could not be written to {log_file} ({write_error.strerror})"
    summary = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (f"internal error in {where}: {type(exc).__name__}{': ' + summary[:300] if summary else ''}; {details} "
            "(this is a bug or a broken installation, not your input: please report it with that file)")
