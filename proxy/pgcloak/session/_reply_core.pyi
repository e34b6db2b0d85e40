"""Types of SessionAudit's per-statement calls in C (_reply_core.c); auditing.py is its only user."""

from collections.abc import Callable
from typing import Any

class Unit:
    recipe: Any
    lookups: dict[str, list[str]] | None
    simple: bool
    plan: Any
    text: str | None
    keys: set[str] | None
    started: float
    rows: int | None
    sqlstate: str | None

def configure(
    template_type: type[Any],
    watched_type: type[Any],
    sync_unit: object,
    envelope_prefix: bytes,
    monotonic: Callable[[], float],
    time_ns: Callable[[], int],
    unit_type: type[Unit],
    skip_execute: object,
    max_portals: int,
    skip_query: object,
    /,
) -> None: ...
class Core:
    """SessionAudit's base: its per-statement state, and the calls that change it."""

    _units: Any
    @property
    def pending(self) -> Any: ...
    _portals: dict[bytes, Any]
    _recipes: dict[int, Any]
    log: Any
    _returned: int
    statements: int
    def reply(self, chunk: bytes, marks: list[Any], tail_rows: int, /) -> None: ...
    def query(self, plan: Any, lookups: dict[str, list[str]], text: str | None = None, /) -> None: ...
    def bind(self, portal: bytes, plan: Any, lookups: dict[str, list[str]], text: str | None = None, /) -> None: ...
    def execute(self, portal: bytes, /) -> None: ...
    def sync(self) -> None: ...

def one_reply(audit: Any, chunk: bytes, marks: list[Any], tail_rows: int, /) -> bool: ...
