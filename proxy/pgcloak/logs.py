"""Structured logging: one event name plus key=value fields, as text or JSON lines.

Call sites pass facts (session id, user, SQLSTATE), never statement text, literals or
secrets; the formatter only prints what it is given, so that rule is enforced by
what the session code hands over (tests grep the logs for test secrets).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RESERVED}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{ts}.{int(record.msecs):03d}Z {record.levelname.lower():7} {record.getMessage()}"
        if extra:
            line += " " + extra
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "pid": os.getpid(),
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("pgcloak")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # sqlglot warns with the statement's text (literals and all) when it falls back to a
    # Command; with no handler of its own Python's last-resort handler would print that
    # on stderr. Statement text never goes in our logs, so its records stop here.
    quiet = logging.getLogger("sqlglot")
    quiet.handlers[:] = [logging.NullHandler()]
    quiet.propagate = False
