"""The names the server knows the client's statements by, statements pgcloak prepares
on the client's behalf, and following the server's replies.

What a Bind runs must be the text pgcloak planned under that name, whatever the server
kept: a Close or DEALLOCATE that failed (an aborted transaction, a batch skipped after an
error) leaves the old statement on the server, PostgreSQL then refuses the client's next
Parse of the name (42P05), and its Binds would run the old statement with values planned
for the new one. So a named statement is prepared on the server under a name of
pgcloak's that is never used twice (:func:`statement_name`), and the client's Bind,
Describe and Close (and SQL-level DEALLOCATE) are sent to that name: a Parse the server
refused or skipped leaves nothing a Bind could reach, whatever else failed. The unnamed
statement is left unnamed (PostgreSQL plans it for each Bind's values, and drops it at
the next Parse or Query); the one thing that could leave an older one in its place is a
Parse the server skipped, so a Bind of it in a later batch than its Parse (counted on
the client's side) is sent after that Parse again, in its own batch: PostgreSQL's one
guarantee is the order within a batch. Names are never guessable either (random bits):
a function could PREPARE a name before pgcloak does.

A statement is planned once, at its Parse, for the policy and search_path of that moment.
PostgreSQL analyses a prepared statement again, silently, when the search_path it was
parsed under changes; pgcloak's plan (which columns are encrypted, which table a name is
bound to) cannot follow it there. So when a statement is bound after the rules changed
and its text now plans differently, the session parses the text again, as planned now,
under an internal name, and sends the client's Bind to that name instead. The client
sees what PostgreSQL would have shown it: its statement runs, under the rules in force
(or is refused by them). While the session's count of batches is uncertain
(:attr:`~pgcloak.session.search_path.SessionSearchPath.uncertain`), it gets 0A000
"prepare it again" instead.

The server answers that extra Parse (and the Close of an internal statement no longer
needed) with ParseComplete / CloseComplete, which the client must not see. Those
replies carry nothing to tell them apart, so :class:`Acks` keeps every Parse and
Close in flight in the order the server answers them, with the batch (Query, Sync,
FunctionCall) each belongs to: an ErrorResponse makes the server skip the rest of
its batch, so whatever of a batch was not answered by its ReadyForQuery never will be.
The same bookkeeping tells which of the client's Parses the server prepared: only for
the client's sake (a statement that failed is answered 26000 under its own name) and
to close what is no longer needed, never for what a Bind runs.

Pure (no IO): the session feeds the client's messages and the server's marks.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from pgcloak.wire.framing import Mark

if TYPE_CHECKING:
    from pgcloak.session.protection import Protection
    from pgcloak.sql import Plan

__all__ = [
    "ACKS",
    "INTERNAL_PREFIX",
    "STATEMENT_PREFIX",
    "Acks",
    "Closing",
    "Prepared",
    "cut",
    "internal_name",
    "reserved",
    "statement_name",
]

#: ParseComplete, CloseComplete: the replies counted here.
ACKS: Final = frozenset(b"13")
_READY: Final = ord("Z")
#: Names of the statements pgcloak prepares itself; a client may not use them.
INTERNAL_PREFIX: Final = "pgcloak_reprepared_"
#: The server's names of the client's named statements.
STATEMENT_PREFIX: Final = "pgcloak_stmt_"
_serial = itertools.count(1)


def internal_name() -> str:
    """A statement name no client statement has (clients are refused the prefix), and
    not guessable (a function could PREPARE it first)."""
    return f"{INTERNAL_PREFIX}{next(_serial)}_{os.urandom(6).hex()}"


def statement_name() -> str:
    """The server's name for a client's named statement: never used twice, and not
    guessable (a function could PREPARE the next one behind pgcloak's back)."""
    return f"{STATEMENT_PREFIX}{next(_serial)}_{os.urandom(6).hex()}"


def reserved(name: str) -> bool:
    """A name of pgcloak's own, which a client may not use."""
    return name.startswith(INTERNAL_PREFIX) or name.startswith(STATEMENT_PREFIX)


class Prepared:
    """A statement the client prepared with the protocol, as pgcloak planned it."""

    __slots__ = ("answered", "batch", "name", "plan", "protection", "query", "server", "tail", "text")

    def __init__(
        self,
        name: str,
        server: str,
        protection: Protection,
        plan: Plan,
        text: str,
        query: bytes,
        tail: bytes,
        batch: int | None,
    ) -> None:
        self.name = name
        #: The name the server knows it by ("" for the unnamed statement).
        self.server = server
        #: The rules it was planned under, its plan, its text and the Parse's tail (its
        #: parameter types).
        self.protection = protection
        self.plan = plan
        self.text = text
        #: The query as sent to the server (literals transformed), and the Parse's tail.
        self.query = query
        self.tail = tail
        #: The client's batch its Parse was sent in (counted on the client's side: what
        #: PostgreSQL takes as one batch), and whether the server answered it with
        #: ParseComplete (only for the client's sake: replies are matched by position).
        self.batch = batch
        self.answered = batch is None


class Closing:
    """A client's Close of a named statement, sent to the server's name: closed again
    (by pgcloak) if the server skips it."""

    __slots__ = ("server",)

    def __init__(self, server: str) -> None:
        self.server = server


class _Ours:
    """A Parse (or Close) pgcloak sent itself: its reply is not the client's."""

    __slots__ = ("client_name", "internal", "parse")

    def __init__(self, parse: bool, client_name: str, internal: str) -> None:
        self.parse = parse
        self.client_name = client_name
        self.internal = internal


class Acks:
    """The Parse and Close messages in flight, in the order the server answers them."""

    __slots__ = ("_flight",)

    def __init__(self) -> None:
        #: (batch number, the client's Parse or Close (None: nothing to follow of it),
        #: or :class:`_Ours`).
        self._flight: deque[tuple[int, _Ours | Prepared | Closing | None]] = deque()

    @property
    def busy(self) -> bool:
        return bool(self._flight)

    def sent(self, batch: int, statement: Prepared | Closing | None = None) -> None:
        """The client sent a Parse (of ``statement``, when pgcloak took it) or a Close in
        batch ``batch`` (numbered by the session)."""
        self._flight.append((batch, statement))

    def sent_ours(self, batch: int, *, parse: bool, client_name: str, internal: str) -> None:
        self._flight.append((batch, _Ours(parse, client_name, internal)))

    def renumber(self, after: int, by: int) -> None:
        """Batches after ``after`` are numbered ``by`` lower (Syncs PostgreSQL ignored)."""
        self._flight = deque((b - by if b > after else b, ours) for b, ours in self._flight)

    def replies(
        self, marks: Iterable[Mark], answered: int, seen: int = 0
    ) -> tuple[list[tuple[int, int]], list[_Ours | Prepared | Closing]]:
        """Follow the server's replies (``marks``: ReadyForQuery, ParseComplete and
        CloseComplete at least, in order), ``answered`` batches having been answered
        before them; the first ``seen`` ReadyForQuery messages were followed already
        (held back while the session asked PostgreSQL something). Returns the spans of
        our replies to cut out, and the Parses and Closes (ours and the client's) the
        server skipped or refused (it never prepared, or never closed, those
        statements). A client's statement the server prepared is marked so."""
        flight = self._flight
        cuts: list[tuple[int, int]] = []
        failed: list[_Ours | Prepared | Closing] = []
        for kind, pos, end, _rows in marks:
            if kind == _READY:
                if seen:
                    seen -= 1
                    continue
                answered += 1
                while flight and flight[0][0] < answered:
                    ours = flight.popleft()[1]
                    if ours is not None:
                        failed.append(ours)
            elif kind in ACKS and flight:
                ours = flight.popleft()[1]
                if isinstance(ours, _Ours):
                    cuts.append((pos, end))
                elif isinstance(ours, Prepared):
                    ours.answered = True
            if not flight:
                break
        return cuts, failed


def cut(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    """``data`` without the byte ranges in ``spans`` (in order, not overlapping)."""
    out: list[bytes] = []
    run = 0
    for start, end in spans:
        if start >= len(data):
            break
        out.append(data[run:start])
        run = end
    out.append(data[run:])
    return b"".join(out)
