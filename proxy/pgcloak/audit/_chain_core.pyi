"""Types of the C loop (_chain_core.c); chain.py is its only user."""

from typing import Any

class Record:
    data: bytes
    seq: int
    chain: str
    mac: str
    ts: str
    type: str
    _line: str | None
    _record: dict[str, Any] | None

class Intake:
    queue: Any
    slow: Any
    fast_below: int
    emitted: int
    def __init__(self, queue: Any, slow: Any) -> None: ...
    def __call__(self, item: Any, /) -> None: ...

class Hmac:
    def __init__(self, key: bytes) -> None: ...
    def hexdigest(self, data: bytes, /) -> str: ...

def configure(
    record_type: type[Record],
    invalid_error: type[Exception],
    key_ids_ok: set[str],
    key_json: dict[str, str],
    failed_reason: str,
    /,
) -> None: ...
def chain_completed(chain: Any, items: list[Any], start: int, out: list[Any], refused: list[Exception], /) -> int: ...
def tuple_run_end(items: list[Any], start: int, /) -> int: ...
