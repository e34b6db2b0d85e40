"""One session's ``search_path`` as pgcloak follows it (pure; the session feeds it).

The session learns the path PostgreSQL gave it at start-up (``current_setting``, so
``ALTER ROLE/DATABASE ... SET search_path``, ``options=-c search_path=...`` and the
server's configuration all count), then follows the changes its client sends
(:func:`pgcloak.sql.search_path.search_path_change`) with PostgreSQL's transaction
rules: a ``SET`` holds from then on unless its transaction (a block, or the implicit one of
a Query or an extended-protocol batch) rolls back; ``SET LOCAL`` ends with its
transaction; ``RESET``/``DISCARD ALL`` return to the start-up value.

What it cannot see (documented in README): a change made inside a function, a
``ROLLBACK TO SAVEPOINT`` or ``ROLLBACK AND CHAIN`` undoing a ``SET``, and the order of a
change and a ``COMMIT`` sent in one pipelined batch.
"""

from __future__ import annotations

from pgcloak.sql.search_path import DEFAULT_PATH, SearchPathChange, parse_setting, resolve_items

__all__ = ["SessionSearchPath"]

_IDLE = ord("I")


class SessionSearchPath:
    """The schemas unqualified table names resolve against, now, in one session.

    The client's changes apply when they are sent (the statements after them are
    planned for them); the server's replies then settle them: :meth:`commit` at a
    CommandComplete ``COMMIT``, :meth:`failed` at an ErrorResponse, :meth:`ready` at
    ReadyForQuery. While nothing is left to settle (:attr:`settled`), the session need
    not look at replies at all.
    """

    __slots__ = ("_failed", "committed", "current", "default", "in_transaction", "local", "session", "user")

    def __init__(self, user: str, setting: str | None) -> None:
        self.user = user
        #: What RESET returns to: the path the session started with.
        self.default = parse_setting(setting, user) if setting is not None else DEFAULT_PATH
        #: The session-level value PostgreSQL has committed (what a rollback restores).
        self.committed = self.default
        #: The session-level value now, committed or not.
        self.session = self.default
        #: A SET LOCAL's value until its transaction ends.
        self.local: tuple[str, ...] | None = None
        #: In a transaction block, as of the last ReadyForQuery.
        self.in_transaction = False
        self._failed = False
        #: What the planner resolves against (``local`` if set, else ``session``).
        self.current = self.default

    @property
    def settled(self) -> bool:
        """No change waits for the server's word (replies cannot change anything)."""
        return self.local is None and self.session is self.committed

    def apply(self, change: SearchPathChange) -> str | None:
        """Follow a change the client sends; the reason it is refused, or None."""
        if change.kind == "refuse":
            return change.message
        new = self.default if change.kind == "reset" else resolve_items(change.items, self.user)
        if change.local:
            # Until the transaction ends: a block, or the implicit one of a Query or of
            # an extended-protocol batch (outside both, PostgreSQL ignores it: harmless).
            self.local = new
        else:
            self.session = new
            self.local = None
        self._update()
        return None

    def commit(self) -> None:
        """A COMMIT succeeded: the block's changes hold (SET LOCAL's end)."""
        self.committed = self.session
        self.local = None
        self._update()

    def failed(self) -> None:
        """An ErrorResponse: the implicit transaction it ends is rolled back."""
        self._failed = True

    def ready(self, status: int) -> None:
        """A ReadyForQuery with transaction ``status`` (``I``, ``T`` or ``E``).

        Idle again: a batch outside a block took effect unless it failed; a block that
        ended without a COMMIT (ROLLBACK, a failed COMMIT) is undone.
        """
        if status == _IDLE:
            if not self.in_transaction and not self._failed:
                self.committed = self.session
            self.session = self.committed
            self.local = None
            self._update()
        self._failed = False
        self.in_transaction = status != _IDLE

    def _update(self) -> None:
        self.current = self.local if self.local is not None else self.session
