"""``pgcloak audit verify`` / ``who-accessed`` as functions over files."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest

from pgcloak.audit import cli
from pgcloak.audit.chain import Chain
from pgcloak.audit.events import SessionInfo, connection_event, statement_event
from pgcloak.crypto.blind_index import blind_index
from pgcloak.crypto.keyring import Keyring
from pgcloak.crypto.keys import MasterKey

KEYRING = Keyring(MasterKey(bytes(range(32))))
KEY = KEYRING.audit_key()
EMAIL = "public.users.email"
ALICE, BOB = "alice@example.com", "bob@example.com"


def _write_trail(path: Path) -> list[str]:
    chain = Chain(KEY, "w0-cli", worker=0)
    alice = SessionInfo(session="s1", user="support", database="appdb", client="10.0.0.1:4000",
                        application_name="crm", worker=0)
    lines = [
        chain.append(connection_event(alice, action="authenticated", tls=True)).line,
        chain.append(statement_event(
            alice, kind="select", fingerprint="SELECT * FROM users WHERE email = $1",
            tables=["public.users"], columns_read=[EMAIL],
            lookups={EMAIL: [blind_index(KEYRING, EMAIL, ALICE, "email")]}, rows=1,
        )).line,
        chain.append(statement_event(
            alice, kind="select", fingerprint="SELECT * FROM users WHERE email = $1",
            tables=["public.users"], columns_read=[EMAIL],
            lookups={EMAIL: [blind_index(KEYRING, EMAIL, BOB, "email")]}, rows=1,
        )).line,
        chain.append(statement_event(
            alice, kind="select", fingerprint="SELECT email FROM users LIMIT $1",
            tables=["public.users"], columns_read=[EMAIL], rows=50,
        )).line,
        chain.seal("shutdown").line,
    ]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return lines


def _run(fn: object, *args: object, **kw: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = fn(*args, out=out, err=err, **kw)  # type: ignore[operator]
    return code, out.getvalue(), err.getvalue()


def test_verify_ok_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_trail(path)
    code, out, _ = _run(cli.verify, [path], KEY)
    assert code == cli.EXIT_OK
    assert out.startswith("OK: 1 chain(s), 5 record(s) in 1 source(s)")
    assert "chain w0-cli: seq 1-5, 4 event(s), 1 seal(s), sealed at shutdown" in out


def test_verify_key_loader_and_gzip(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _write_trail(path)
    gz = tmp_path / "audit.jsonl.1.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    calls = []

    def load() -> bytes:
        calls.append(1)
        return KEY

    code, out, _ = _run(cli.verify, [gz], load)
    assert code == 0 and calls == [1] and out.startswith("OK")


def test_verify_names_the_first_problem(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _write_trail(path)
    record = json.loads(lines[1])
    record["rows"] = 0
    lines[1] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    code, out, _ = _run(cli.verify, [path], KEY)
    assert code == cli.EXIT_PROBLEM
    assert out.startswith(f"FAILED: {path}:2: seq 2 of chain w0-cli: edited:")


def test_verify_input_errors(tmp_path: Path) -> None:
    code, _, err = _run(cli.verify, [tmp_path / "missing.jsonl"], KEY)
    assert code == cli.EXIT_ERROR and "no such file" in err
    code, _, err = _run(cli.verify, [], KEY)
    assert code == cli.EXIT_ERROR
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, out, _ = _run(cli.verify, [empty], KEY)
    assert code == cli.EXIT_PROBLEM and "no audit records" in out


def test_who_accessed_by_blind_index(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_trail(path)
    wanted = blind_index(KEYRING, EMAIL, "  Alice@Example.com ", "email")
    code, out, _ = _run(cli.who_accessed, [path], EMAIL, [wanted], key=KEY)
    assert code == cli.EXIT_OK
    assert out.count("match=lookup") == 1
    assert "user=support" in out and "client=10.0.0.1:4000" in out and "app=crm" in out
    assert "SELECT * FROM users WHERE email = $1" in out
    assert "MAC-INVALID" not in out
    assert out.rstrip().endswith(f"1 event(s) for {EMAIL}")
    assert ALICE not in out


def test_who_accessed_column_access_and_json(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _write_trail(path)
    wanted = blind_index(KEYRING, EMAIL, ALICE, "email")
    code, out, _ = _run(cli.who_accessed, [path], EMAIL, [wanted], include_column_access=True,
                        fmt="json")
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 3  # the alice lookup, the bob lookup and the LIMIT scan read the column
    code, out, _ = _run(cli.who_accessed, [path], "public.users.phone", [wanted])
    assert code == cli.EXIT_PROBLEM and "0 event(s)" in out


def test_who_accessed_flags_forged_events(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _write_trail(path)
    record = json.loads(lines[1])
    record["user"] = "someone_else"
    lines[1] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")
    wanted = blind_index(KEYRING, EMAIL, ALICE, "email")
    code, out, _ = _run(cli.who_accessed, [path], EMAIL, [wanted], key=KEY)
    assert code == 0 and "MAC-INVALID" in out


@pytest.mark.parametrize("fn", [cli.verify, cli.who_accessed])
def test_missing_file_is_exit_2(tmp_path: Path, fn: object) -> None:
    args = ([tmp_path / "nope"], KEY) if fn is cli.verify else ([tmp_path / "nope"], EMAIL, ["x" * 22])
    code, _, _ = _run(fn, *args)
    assert code == cli.EXIT_ERROR


def test_verify_prints_what_a_forged_record_says_escaped(tmp_path: Path) -> None:
    """No key is needed to forge a record's chain id: one holding terminal control codes
    (erase the line, go back, print OK) or a lone surrogate is printed escaped, so the
    reader sees FAILED, and printing it never fails."""
    path = tmp_path / "audit.jsonl"
    lines = _write_trail(path)
    forged = json.dumps({"seq": 1, "chain": "\x1b[2K\rOK: 1 chain(s)\x1b[8m\ud800\x9b", "prev": "0", "mac": "0"})
    path.write_text(forged + "\n" + "".join(line + "\n" for line in lines), encoding="utf-8")
    code, out, _ = _run(cli.verify, [path], KEY)
    assert code == cli.EXIT_PROBLEM and out.startswith("FAILED: ")
    assert "\\x1b[2K\\x0dOK" in out and "\\ud800" in out and "\\x9b" in out
    assert not any(ch in out for ch in "\x1b\r\x9b") and "\ud800" not in out
    out.encode("utf-8")  # printable on any UTF-8 terminal


def test_who_accessed_json_is_json_whatever_the_names_hold(tmp_path: Path) -> None:
    """A role or application name may hold control characters (DEL, C1): the JSON output
    escapes them as JSON does, so every line still parses."""
    chain = Chain(KEY, "w0-json", worker=0)
    odd = SessionInfo(session="s9", user="r\x7fole\x85", database="appdb", client="10.0.0.9:1",
                      application_name="app\x1b[2K", worker=0)
    wanted = blind_index(KEYRING, EMAIL, ALICE, "email")
    line = chain.append(statement_event(
        odd, kind="select", fingerprint="SELECT * FROM users WHERE email = $1",
        tables=["public.users"], columns_read=[EMAIL], lookups={EMAIL: [wanted]}, rows=1,
    )).line
    path = tmp_path / "audit.jsonl"
    path.write_text(line + "\n" + chain.seal("shutdown").line + "\n", encoding="utf-8")
    code, out, _ = _run(cli.who_accessed, [path], EMAIL, [wanted], fmt="json")
    assert code == 0
    (event,) = [json.loads(text) for text in out.splitlines()]
    assert event["user"] == "r\x7fole\x85" and out.isascii()
