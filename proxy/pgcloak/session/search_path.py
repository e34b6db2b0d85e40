"""One session's ``search_path`` as pgcloak follows it (pure; the session feeds it).

PostgreSQL is the authority: the session asks it (the setting, and the user ``"$user"``
means) when it starts, and again at the first idle moment after any statement that may
have changed the path (:attr:`SessionSearchPath.known` is False meanwhile). In between,
within the batch that makes a change, the statements after it are planned for what the
change predicts (if the change fails, PostgreSQL skips them).
So the transaction rules (a rolled-back ``SET``, ``SET LOCAL``, savepoints, ``COMMIT AND
CHAIN``, ``PREPARE TRANSACTION``), ``SET ROLE`` with ``"$user"``, ``RESET`` and changes
made by ``DO`` and procedures all come out as PostgreSQL has them, without pgcloak
modelling them.

A statement planned while the path is unknown (a client pipelining past a change) is
refused if it names, unqualified, a table the policy protects in some schema.
"""

from __future__ import annotations

from pgcloak.sql.search_path import SearchPathChange, parse_setting, resolve_items

__all__ = ["SessionSearchPath"]

_IDLE, _FAILED = ord("I"), ord("E")


class SessionSearchPath:
    """The schemas unqualified table names resolve against, now, in one session."""

    __slots__ = (
        "_block_changed",
        "_changed",
        "_copy",
        "current",
        "in_transaction",
        "outstanding",
        "sent",
        "unsynced",
        "user",
    )

    def __init__(self, user: str, current: tuple[str, ...] | None) -> None:
        self.user = user
        #: What the planner resolves against; None: unknown until PostgreSQL is asked.
        self.current = current
        #: In a transaction block, as of the last ReadyForQuery.
        self.in_transaction = False
        #: Batches (Query, Sync, FunctionCall) sent and not yet answered by ReadyForQuery.
        self.outstanding = 0
        #: Batches sent in all: the client's current batch has this number, the oldest
        #: one not yet answered ``sent - outstanding``.
        self.sent = 0
        #: Extended-protocol messages sent since the last Sync: a query now would land in
        #: the client's batch (and end its unnamed portal).
        self.unsynced = False
        #: A COPY FROM STDIN was bound: PostgreSQL ignores the Syncs of its copy-in mode.
        self._copy = False
        #: A change was sent in the client's current batch.
        self._changed = False
        #: A change was made in the current transaction block: its end (or a savepoint
        #: rollback) may undo it, so every batch of the block ends with the path unknown.
        self._block_changed = False

    @property
    def known(self) -> bool:
        return self.current is not None

    def apply(self, change: SearchPathChange) -> str | None:
        """Follow a change the client sends; the reason it is refused, or None."""
        if change.kind == "refuse":
            return change.message
        self.current = resolve_items(change.items, self.user) if change.kind == "set" else None
        self._changed = True
        return None

    def copy_started(self) -> None:
        self._copy = True

    def copy_ended(self) -> None:
        self._copy = False

    def batch_end(self) -> None:
        """The client ended a batch (Query, Sync, FunctionCall): after a change, the path
        is PostgreSQL's to say once the batch is through."""
        self.unsynced = False
        if self._copy:
            return  # a Sync PostgreSQL ignores (copy-in mode): no ReadyForQuery for it
        self.outstanding += 1
        self.sent += 1
        if self._changed or self._block_changed:
            self.current = None
            self._changed = False

    def ready(self, status: int) -> None:
        """A ReadyForQuery with transaction ``status`` (``I``, ``T`` or ``E``) ends a batch."""
        if self.outstanding:
            self.outstanding -= 1
        self._copy = False
        self.in_transaction = status != _IDLE
        if not self.in_transaction:
            self._block_changed = False

    def should_ask(self, status: int) -> bool:
        """Whether to ask PostgreSQL now, at a ReadyForQuery with ``status`` (after
        :meth:`ready`): the path is unknown, nothing else is in flight or half sent, and
        the transaction has not failed (its queries would)."""
        return self.current is None and self.outstanding == 0 and not self.unsynced and status != _FAILED

    def learned(self, setting: str, user: str, status: int) -> None:
        """PostgreSQL's answer, asked at a ReadyForQuery with ``status``."""
        self.user = user
        self.current = parse_setting(setting, user)
        if status != _IDLE:
            self._block_changed = True
