"""The policy watcher outlives any bad edit, and applies an edit only once it is whole.

A watcher that died of one bad edit (YAML nested too deeply raised RecursionError, a
number of 5000 digits ValueError: neither was a PolicyError) left every later edit
unapplied, silently: a column protected afterwards was stored in clear. And a file
rewritten in place in several writes showed the watcher a valid prefix of the policy
(one missing its last column), which it applied.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from encryption_fixtures import USERS, EncEnv, encryption_env, policy_yaml, unique

from pgcloak.policy import PolicyError, parse_policy
from pgcloak.session import server as server_module
from pgcloak.session.server import PolicyFileWatch, ProxyServer, file_stamp


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def server_of(env: EncEnv) -> ProxyServer:
    server = env.proxy.server
    assert server is not None
    return server


def phone_is_protected(env: EncEnv) -> bool:
    email = unique("watch")
    with env.psy() as conn:
        conn.execute("INSERT INTO users (email, phone) VALUES (%s, %s)", (email, "555-0123"))
    stored = env.raw_one("SELECT phone FROM users WHERE left(email, 22) = %s", env.index_of(USERS, "email", email))
    if stored == "555-0123":
        return False
    env.assert_stored(stored, "555-0123", USERS, "phone")
    return True


@pytest.mark.parametrize(
    "bad",
    ["[" * 5000 + "\n", "- " * 5000 + "x\n", "version: 1" + "0" * 5000 + "\ntables: {}\n"],
    ids=["nested-flow", "nested-block", "huge-integer"],
)
def test_an_unreadable_edit_is_refused_and_the_next_edit_is_applied(
    pg, pg_app_user, tmp_path: Path, bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    with encryption_env(
        pg, pg_app_user, tmp_path, "watcher", policy=policy_yaml(phone=False), policy_poll_interval=0.1
    ) as env:
        server = server_of(env)
        env.write_policy(bad)
        assert wait_until(lambda: server.policy_reloads["refused"] >= 1), "the bad edit was not refused"
        assert not phone_is_protected(env)  # the last good policy keeps serving
        env.write_policy(policy_yaml(phone=True))  # protects users.phone
        assert wait_until(lambda: server.policy_reloads["applied"] >= 1), "the watcher is dead"
        assert phone_is_protected(env)
        assert server.policy_reloads == {"refused": 1, "applied": 1}
    refusals = [r for r in caplog.records if r.getMessage().startswith("policy edit refused")]
    assert len(refusals) == 1
    reason = str(refusals[0].__dict__["reason"])
    assert reason.startswith(f"{env.policy_path}:1:") and "Traceback" not in reason


def test_the_watcher_survives_a_failure_nobody_foresaw(
    pg, pg_app_user, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever a reload attempt raises, it is refused and counted, and polling goes on."""

    def explode(*args: object, **kwargs: object) -> object:
        raise RuntimeError("unforeseen")

    with encryption_env(
        pg, pg_app_user, tmp_path, "watcher", policy=policy_yaml(phone=False), policy_poll_interval=0.1
    ) as env:
        server = server_of(env)
        for name in ("policy_from_bytes", "load_policy"):  # what the watcher reads with
            monkeypatch.setattr(server_module, name, explode, raising=False)
        env.write_policy(policy_yaml(phone=False) + "# edited\n")
        assert wait_until(lambda: server.policy_reloads["refused"] >= 1)
        monkeypatch.undo()
        env.write_policy(policy_yaml(phone=True))
        assert wait_until(lambda: server.policy_reloads["applied"] >= 1), "the watcher is dead"
        assert phone_is_protected(env)


def test_sighup_reloads_tls_and_users_even_when_the_policy_reload_fails(
    pg, pg_app_user, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: object, **kwargs: object) -> object:
        raise RuntimeError("unforeseen")

    with encryption_env(
        pg, pg_app_user, tmp_path, "hup", policy=policy_yaml(phone=False), policy_poll_interval=3600
    ) as env:
        server = server_of(env)
        before = server.tls, server.verifiers
        for name in ("policy_from_bytes", "load_policy"):
            monkeypatch.setattr(server_module, name, explode, raising=False)
        loop = env.proxy._loop
        assert loop is not None
        loop.call_soon_threadsafe(server.reload)  # what SIGHUP calls
        assert wait_until(lambda: server.tls is not before[0]), "the TLS files were not reloaded"
        assert server.verifiers is not before[1]
        assert server.policy_reloads["refused"] == 1
        monkeypatch.undo()
        assert not phone_is_protected(env)


# users is the last table and phone its last column: every prefix of the file that
# ends at a line is a valid policy, the one just before phone too.
WHOLE = (
    "version: 1\n"
    "default_read: reveal\n"
    "guards: {unbounded_select: allow, max_pii_rows: null}\n"
    "tables:\n"
    "  public.orders:\n"
    "    buyer_email: {index: exact, normalize: email, join_group: customer_email}\n"
    "  public.users:\n"
    "    email: {encrypt: true, index: exact, normalize: email, join_group: customer_email}\n"
    "    ssn: {encrypt: true}\n"
    "    phone: {encrypt: true, index: exact, normalize: phone}\n"
)
PREFIX = WHOLE[: WHOLE.index("    phone:")]


def test_a_policy_rewritten_in_place_is_applied_only_whole(pg, pg_app_user, tmp_path: Path) -> None:
    """``cat new.yaml > policy.yaml`` (or an editor saving in place) writes the file in
    pieces. A prefix that is a valid policy, there for less than a poll interval, is never
    applied: an edit is taken once it has stayed unchanged for one poll."""
    assert parse_policy(PREFIX).column(USERS, "phone") is None
    # The prefix stays 0.2 s, a poll interval is 1 s: only a stall of 0.8 s on a loaded
    # machine could make two polls see it (the unit test below checks the rule exactly).
    interval = 1.0
    with encryption_env(pg, pg_app_user, tmp_path, "inplace", policy=WHOLE, policy_poll_interval=interval) as env:
        server = server_of(env)
        fd = os.open(env.policy_path, os.O_WRONLY)
        try:
            for _ in range(4):
                os.ftruncate(fd, 0)
                os.pwrite(fd, PREFIX.encode(), 0)
                time.sleep(0.2)  # the writer is slow, or busy
                os.pwrite(fd, WHOLE[len(PREFIX) :].encode(), len(PREFIX))
                time.sleep(interval * 1.2)
        finally:
            os.close(fd)
        time.sleep(interval * 2.5)
        assert server.policy_reloads == {}, "a part of the rewritten file was applied (or refused)"
        assert phone_is_protected(env)
        # an edit that stays is applied within two polls or so
        env.write_policy(WHOLE.replace("    ssn: {encrypt: true}\n", ""))
        assert wait_until(lambda: server.policy_reloads["applied"] == 1, interval * 4 + 2)


def test_policy_file_watch_takes_a_change_once_it_has_settled(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("one\n")
    watch = PolicyFileWatch(path)
    assert watch.poll() is None  # nothing changed
    path.write_text("two\n")
    assert watch.poll() is None  # changed: look again
    assert watch.poll() == b"two\n"  # the same as last time: taken
    assert watch.poll() is None  # once
    with path.open("a") as f:
        f.write("three\n")
        f.flush()
        assert watch.poll() is None
        f.write("four\n")
        f.flush()
        assert watch.poll() is None  # changed again since the last poll
    assert watch.poll() == b"two\nthree\nfour\n"
    path.write_text("TWO\nthree\nfour\n")
    assert watch.poll() is None
    # rewritten since, with the same size and mtime: the hash tells
    stamp = os.stat(path)
    path.write_text("TwO\nthree\nfour\n")
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert watch.poll() is None
    assert watch.poll() == b"TwO\nthree\nfour\n"
    path.unlink()
    assert watch.poll() is None
    with pytest.raises(PolicyError, match="cannot read the policy"):
        watch.poll()  # refused once
    assert watch.poll() is None
    assert watch.poll() is None
    path.write_text("five\n")
    assert watch.poll() is None
    assert watch.poll() == b"five\n"


def test_a_file_rewritten_every_poll_with_the_same_bytes_is_applied(tmp_path: Path) -> None:
    # An agent re-syncing the file in place every poll gives it a new mtime each time:
    # settling on stamps, the edit was never applied (review of session 13).
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"old: 1\n")
    watch = PolicyFileWatch(path)
    got = []
    for tick in range(2, 6):
        path.write_bytes(b"new: 2\n")
        os.utime(path, ns=(tick * 1_000_000_000, tick * 1_000_000_000))
        got.append(watch.poll())
    assert got[:2] == [None, b"new: 2\n"], got


def test_a_settled_edit_older_than_a_sighup_is_not_applied_over_it(pg, pg_app_user, tmp_path: Path) -> None:
    """The watcher reads an edit, then waits for a reload under way; a SIGHUP queued
    before it reads the newer file. The watcher's older bytes must not replace it (they
    did, and the newer edit was then never looked at again)."""
    with encryption_env(pg, pg_app_user, tmp_path, "stale", policy=WHOLE, policy_poll_interval=0.1) as env:
        server = server_of(env)
        proxy = env.proxy
        loop = proxy._loop
        assert loop is not None
        assert asyncio.run_coroutine_threadsafe(server._reloading.acquire(), loop).result(5)  # a reload under way
        try:
            env.write_policy(PREFIX)  # B: phone unprotected
            loop.call_soon_threadsafe(server.reload)  # SIGHUP, queued behind the reload under way
            assert wait_until(lambda: server._policy_watch is not None and server._policy_watch.taken == file_stamp(env.policy_path))
            time.sleep(0.3)  # the watcher waits for the lock with B's bytes
            env.write_policy(WHOLE.replace("    ssn: {encrypt: true}\n", ""))  # C: phone protected, ssn not
        finally:
            loop.call_soon_threadsafe(server._reloading.release)
        time.sleep(1.0)  # the SIGHUP applies C; the watcher's B comes after it and is dropped
        policy = server.protection.policy if server.protection is not None else None
        assert policy is not None
        assert policy.column(USERS, "phone") is not None and policy.column(USERS, "ssn") is None
