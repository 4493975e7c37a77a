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
