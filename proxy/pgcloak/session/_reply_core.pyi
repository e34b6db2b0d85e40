"""Types of SessionAudit's usual reply in C (_reply_core.c); auditing.py is its only user."""

from collections.abc import Callable
from typing import Any

def configure(
    template_type: type[Any],
    watched_type: type[Any],
    sync_unit: object,
    envelope_prefix: bytes,
    monotonic: Callable[[], float],
    time_ns: Callable[[], int],
    /,
) -> None: ...
def one_reply(audit: Any, chunk: bytes, marks: list[Any], tail_rows: int, /) -> bool: ...
def reply(audit: Any, chunk: bytes, marks: list[Any], tail_rows: int, /) -> None: ...
