"""Statement text never reaches the log, including through a library's own logger."""

from __future__ import annotations

import logging

import pytest
import sqlglot

from pgcloak.logs import setup_logging


@pytest.fixture
def restore_loggers() -> object:
    saved = {
        n: (lg.handlers[:], lg.propagate, lg.level)
        for n in ("pgcloak", "sqlglot", "")
        for lg in [logging.getLogger(n)]
    }
    yield None
    for name, (handlers, propagate, level) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:] = handlers
        lg.propagate = propagate
        lg.setLevel(level)


def test_sqlglot_fallback_warning_does_not_print_the_statement(
    capfd: pytest.CaptureFixture[str], restore_loggers: object
) -> None:
    setup_logging("text", "debug")
    # As under `pgcloak run`: the root logger has no handler (pytest gives it its own
    # for each test phase), so a record nobody handles goes to the last-resort handler.
    logging.getLogger().handlers[:] = []
    sql = (
        "CREATE RULE r AS ON INSERT TO t DO ALSO INSERT INTO users (name) VALUES ('SECRET-LIT-7c1')"
    )
    sqlglot.parse_one(sql, read="postgres")  # sqlglot warns and falls back to a Command
    logging.getLogger("pgcloak").info("still logging")
    out, err = capfd.readouterr()
    assert "still logging" in err  # our own log still reaches stderr
    assert "SECRET-LIT-7c1" not in out + err
