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
_NO_COPY, _COPY_BOUND, _COPY_IN, _COPY_SENT = range(4)


class SessionSearchPath:
    """The schemas unqualified table names resolve against, now, in one session."""

    __slots__ = (
        "_block_changed",
        "_changed",
        "_copy",
        "_copy_batch",
        "_tentative",
        "aborted",
        "current",
        "in_transaction",
        "outstanding",
        "sent",
        "uncertain",
        "unsynced",
        "user",
    )

    def __init__(self, user: str, current: tuple[str, ...] | None) -> None:
        self.user = user
        #: What the planner resolves against; None: unknown until PostgreSQL is asked.
        self.current = current
        #: In a transaction block, and in a failed one, as of the last ReadyForQuery.
        self.in_transaction = False
        self.aborted = False
        #: Batches (Query, Sync, FunctionCall) sent and not yet answered by ReadyForQuery.
        self.outstanding = 0
        #: Batches sent in all: the client's current batch has this number, the oldest
        #: one not yet answered ``sent - outstanding``.
        self.sent = 0
        #: A Query or FunctionCall was sent inside an unfinished extended batch: counted
        #: as a batch, but skipped by the server if the batch fails before it. Until
        #: ``outstanding`` comes back to 0, the count may be one too high.
        self.uncertain = False
        #: Extended-protocol messages sent since the last Sync: a query now would land in
        #: the client's batch (and end its unnamed portal).
        self.unsynced = False
        #: A COPY FROM STDIN (extended protocol) and PostgreSQL's copy-in mode, in which it
        #: ignores Sync: _NO_COPY, _COPY_BOUND (whether it starts is the server's to say:
        #: an earlier error, or one of its own, and it never does), _COPY_IN (the server
        #: sent CopyInResponse), _COPY_SENT (the client ended it before that came).
        self._copy = _NO_COPY
        self._copy_batch = 0
        #: Syncs counted since the COPY was bound, before the server said it started.
        self._tentative = 0
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

    def copy_started(self, batch: int | None = None) -> None:
        """The client bound a COPY FROM STDIN in the current batch (or sent one in a simple
        Query, batch ``batch``): the Syncs it sends until the server answers are tentative
        (PostgreSQL ignores them in copy-in mode)."""
        self._copy = _COPY_BOUND
        self._copy_batch = self.sent if batch is None else batch
        self._tentative = 0

    def copy_ended(self) -> None:
        """The client sent CopyDone or CopyFail."""
        self._copy = _COPY_SENT if self._copy == _COPY_BOUND else _NO_COPY

    def copy_in(self) -> tuple[int, int]:
        """The server sent CopyInResponse: the Syncs counted since the COPY was bound
        (before the client ended it) were ignored. Returns the COPY's batch and how many
        Syncs are no longer counted (later batches are numbered that much lower)."""
        undone = self._tentative if self._copy in (_COPY_BOUND, _COPY_SENT) else 0
        self.outstanding -= undone
        self.sent -= undone
        self._copy = _COPY_IN if self._copy == _COPY_BOUND else _NO_COPY
        self._tentative = 0
        return self._copy_batch, undone

    def batch_end(self) -> bool:
        """The client ended a batch (Query, Sync, FunctionCall): after a change, the path
        is PostgreSQL's to say once the batch is through. False for a Sync PostgreSQL
        ignores (copy-in mode): no ReadyForQuery comes for it."""
        self.unsynced = False
        if self._copy == _COPY_IN:
            return False
        if self._copy == _COPY_BOUND:
            self._tentative += 1  # ignored if the COPY starts: undone by copy_in()
        self.outstanding += 1
        self.sent += 1
        if self._changed or self._block_changed:
            self.current = None
            self._changed = False
        return True

    def ready(self, status: int) -> None:
        """A ReadyForQuery with transaction ``status`` (``I``, ``T`` or ``E``) ends a batch."""
        if self.outstanding:
            self.outstanding -= 1
            if not self.outstanding:
                self.uncertain = False
        if self.sent - self.outstanding > self._copy_batch:
            self._copy = _NO_COPY  # the COPY's batch is over (or it never started)
            self._tentative = 0
        self.in_transaction = status != _IDLE
        self.aborted = status == _FAILED
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
