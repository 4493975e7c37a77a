"""User-facing errors: printed as a message (no traceback) and mapped to exit codes."""
from __future__ import annotations

from dataclasses import dataclass


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
