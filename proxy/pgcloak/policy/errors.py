"""Errors for a policy that cannot be used.

Every problem is reported with the file, line and column it comes from, because the
person reading the message is editing a YAML file (or looking at a reload failure in
a log) and should not have to guess which of several ``email:`` keys is meant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Loc = tuple[str | int, ...]
"""A location inside the document: mapping keys and list indexes from the root."""


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One problem in a policy. ``line`` and ``column`` are 1-based, None when unknown."""

    path: str
    reason: str
    line: int | None = None
    column: int | None = None

    def format(self, source: str) -> str:
        where = source
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.path}: {self.reason}" if self.path else f"{where}: {self.reason}"


class PolicyError(ValueError):
    """A policy was refused. ``str()`` gives one ``file:line:col: path: reason`` per problem.

    ``file``, ``line``, ``column``, ``path`` and ``reason`` describe the first problem
    (in document order); ``issues`` holds all of them.
    """

    def __init__(self, source: str, issues: Sequence[PolicyIssue]) -> None:
        if not issues:
            raise ValueError("PolicyError needs at least one issue")
        self.file = source
        self.issues: tuple[PolicyIssue, ...] = tuple(issues)
        super().__init__("\n".join(issue.format(source) for issue in self.issues))

    @property
    def line(self) -> int | None:
        return self.issues[0].line

    @property
    def column(self) -> int | None:
        return self.issues[0].column

    @property
    def path(self) -> str:
        return self.issues[0].path

    @property
    def reason(self) -> str:
        return self.issues[0].reason


@dataclass(frozen=True, slots=True)
class LocatedProblem:
    """A problem found before positions are known; ``at_key`` points at the key, not its value."""

    loc: Loc
    reason: str
    at_key: bool = False


class PolicyInvalid(ValueError):
    """Raised by the compile step with every problem it found; the loader adds positions."""

    def __init__(self, problems: Sequence[LocatedProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(p.reason for p in self.problems))


def format_loc(loc: Loc) -> str:
    """``("tables", "public.users", "email", "index")`` -> ``tables.public.users.email.index``."""
    return ".".join(f"[{part}]" if isinstance(part, int) else part for part in loc).replace(
        ".[", "["
    )
