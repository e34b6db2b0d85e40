"""One session's ``search_path`` as pgcloak follows it (pure; the session feeds it).

The session learns the path PostgreSQL gave it at start-up (``current_setting``, so
``ALTER ROLE/DATABASE ... SET search_path``, ``options=-c search_path=...`` and the
server's configuration all count), then follows the changes its client sends
(:func:`pgcloak.sql.search_path.search_path_change`) with PostgreSQL's transaction
rules: a ``SET`` in a transaction block holds from then on and is undone if the block
rolls back; ``SET LOCAL`` ends with the block; ``RESET``/``DISCARD ALL`` return to the
start-up value.

What it cannot see (documented in README): a change made inside a function, a
``ROLLBACK TO SAVEPOINT`` undoing a ``SET`` made after the savepoint, and a ``SET`` sent
in a pipeline right after the ``BEGIN`` whose reply has not come back yet (taken as
outside the block).
"""

from __future__ import annotations

from pgcloak.sql.search_path import DEFAULT_PATH, SearchPathChange, parse_setting, resolve_items

__all__ = ["SessionSearchPath"]

_IDLE = ord("I")


class SessionSearchPath:
    """The schemas unqualified table names resolve against, now, in one session."""

    __slots__ = ("committed", "current", "default", "in_transaction", "local", "session", "user")

    def __init__(self, user: str, setting: str | None) -> None:
        self.user = user
        #: What RESET returns to: the path the session started with.
        self.default = parse_setting(setting, user) if setting is not None else DEFAULT_PATH
        #: The session-level value as of the last transaction end (what a rollback restores).
        self.committed = self.default
        #: The session-level value now (a SET in an open transaction block changes it).
        self.session = self.default
        #: A SET LOCAL's value until the transaction block ends.
        self.local: tuple[str, ...] | None = None
        self.in_transaction = False
        #: What the planner resolves against (``local`` if set, else ``session``).
        self.current = self.default

    def apply(self, change: SearchPathChange) -> str | None:
        """Follow a change the client sends; the reason it is refused, or None."""
        if change.kind == "refuse":
            return change.message
        new = self.default if change.kind == "reset" else resolve_items(change.items, self.user)
        if change.local:
            if self.in_transaction:  # outside a block PostgreSQL only warns: no effect
                self.local = new
        else:
            self.session = new
            self.local = None
            if not self.in_transaction:
                self.committed = new
        self._update()
        return None

    def ready(self, status: int, committed: bool) -> None:
        """A ReadyForQuery with transaction ``status`` (``I``, ``T``, ``E``); ``committed``:
        the reply before it was a successful COMMIT (else a block that ends, ends undone)."""
        idle = status == _IDLE
        if idle and self.in_transaction:
            if committed:
                self.committed = self.session
            else:
                self.session = self.committed
            self.local = None
            self._update()
        self.in_transaction = not idle

    def _update(self) -> None:
        self.current = self.local if self.local is not None else self.session
