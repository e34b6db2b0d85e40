"""Key sources: environment, file (with permission checks), Shamir shares."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pgcloak.crypto.errors import KeySourceError
from pgcloak.crypto.keys import (
    MasterKey,
    generate_master_key,
    master_key_to_text,
    split_master_key,
)
from pgcloak.crypto.sources import (
    DEFAULT_ENV_VAR,
    EnvKeySource,
    FileKeySource,
    KeySource,
    SharesKeySource,
    read_secret_file,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


@pytest.fixture
def master_key() -> MasterKey:
    return generate_master_key()


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def assert_no_leak(message: str, master_key: MasterKey) -> None:
    key = master_key.expose_secret()
    assert master_key_to_text(master_key) not in message
    assert key.hex() not in message
    assert master_key_to_text(master_key)[:12] not in message


def test_sources_satisfy_protocol(tmp_path: Path) -> None:
    for source in (EnvKeySource(), FileKeySource(tmp_path / "k"), SharesKeySource()):
        assert isinstance(source, KeySource)


# -- environment ----------------------------------------------------------------------


def test_env_source(master_key: MasterKey, monkeypatch: pytest.MonkeyPatch) -> None:
    text = master_key_to_text(master_key)
    assert EnvKeySource("MY_KEY", environ={"MY_KEY": text}).load() == master_key
    monkeypatch.setenv(DEFAULT_ENV_VAR, master_key.expose_secret().hex())
    assert EnvKeySource().load() == master_key


def test_env_source_repr_hides_environment(master_key: MasterKey) -> None:
    source = EnvKeySource("MY_KEY", environ={"MY_KEY": master_key_to_text(master_key)})
    assert "MY_KEY" in repr(source)
    assert_no_leak(repr(source), master_key)


def test_env_source_missing() -> None:
    with pytest.raises(KeySourceError, match="MY_KEY is not set"):
        EnvKeySource("MY_KEY", environ={}).load()
    with pytest.raises(KeySourceError, match="MY_KEY is not set"):
        EnvKeySource("MY_KEY", environ={"MY_KEY": "  "}).load()


def test_env_source_invalid_does_not_echo(master_key: MasterKey) -> None:
    bad = master_key_to_text(master_key)[:-3]
    with pytest.raises(KeySourceError, match="environment variable MY_KEY") as info:
        EnvKeySource("MY_KEY", environ={"MY_KEY": bad}).load()
    assert bad not in str(info.value)
    assert_no_leak(str(info.value), master_key)
    assert info.value.__suppress_context__


# -- file -----------------------------------------------------------------------------


@posix_only
@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_file_source(tmp_path: Path, master_key: MasterKey, mode: int) -> None:
    path = write(tmp_path / "master.key", master_key_to_text(master_key) + "\n", mode)
    assert FileKeySource(path).load() == master_key
    assert FileKeySource(str(path)).load() == master_key


@posix_only
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o610, 0o601])
def test_file_source_refuses_group_or_world_access(
    tmp_path: Path, master_key: MasterKey, mode: int
) -> None:
    path = write(tmp_path / "master.key", master_key_to_text(master_key), mode)
    with pytest.raises(
        KeySourceError, match=f"accessible by group or others \\(mode {mode:04o}\\)"
    ):
        FileKeySource(path).load()


@posix_only
def test_file_source_group_readable_opt_in(tmp_path: Path, master_key: MasterKey) -> None:
    path = write(tmp_path / "master.key", master_key_to_text(master_key), 0o440)
    with pytest.raises(KeySourceError, match="chmod"):
        FileKeySource(path).load()
    assert FileKeySource(path, allow_group_readable=True).load() == master_key
    path.chmod(0o460)  # group write stays forbidden
    with pytest.raises(KeySourceError, match="group or others"):
        FileKeySource(path, allow_group_readable=True).load()
    path.chmod(0o444)  # world read stays forbidden
    with pytest.raises(KeySourceError, match="group or others"):
        FileKeySource(path, allow_group_readable=True).load()


@posix_only
def test_file_source_follows_symlinks_and_checks_target(
    tmp_path: Path, master_key: MasterKey
) -> None:
    # Kubernetes secret volumes are symlinks into ..data/
    target = write(tmp_path / "target.key", master_key_to_text(master_key), 0o600)
    link = tmp_path / "link.key"
    link.symlink_to(target)
    assert FileKeySource(link).load() == master_key
    target.chmod(0o644)
    with pytest.raises(KeySourceError, match="group or others"):
        FileKeySource(link).load()


def test_file_source_missing_and_not_regular(tmp_path: Path) -> None:
    with pytest.raises(KeySourceError, match="does not exist"):
        FileKeySource(tmp_path / "nope").load()
    with pytest.raises(KeySourceError, match="not a regular file"):
        FileKeySource(tmp_path).load()


@posix_only
def test_file_source_invalid_content_not_echoed(tmp_path: Path, master_key: MasterKey) -> None:
    bad = master_key_to_text(master_key)[:-4]
    path = write(tmp_path / "master.key", bad)
    with pytest.raises(KeySourceError, match=str(path)) as info:
        FileKeySource(path).load()
    assert bad not in str(info.value)
    assert_no_leak(str(info.value), master_key)
    path.write_bytes(b"\xff\xfe" * 22)
    with pytest.raises(KeySourceError, match="non-ASCII"):
        FileKeySource(path).load()
    path.write_bytes(b"A" * (64 * 1024 + 1))
    with pytest.raises(KeySourceError, match="larger than"):
        read_secret_file(path)


# -- shares -----------------------------------------------------------------------------


@posix_only
def test_shares_from_files_with_missing_ones(tmp_path: Path, master_key: MasterKey) -> None:
    texts = split_master_key(master_key, shares=5, threshold=3)
    paths = [tmp_path / f"share{i}" for i in range(1, 6)]
    for i in (0, 2, 4):
        write(paths[i], texts[i] + "\n")
    assert SharesKeySource(files=paths).load() == master_key


@posix_only
def test_shares_from_env_and_files(tmp_path: Path, master_key: MasterKey) -> None:
    texts = split_master_key(master_key, shares=5, threshold=3)
    path = write(tmp_path / "share", texts[3])
    environ = {"S1": texts[0], "S2": f"  {texts[1]}\n"}
    source = SharesKeySource(files=[path], env=["S1", "S2", "S3"], environ=environ)
    assert source.load() == master_key
    assert_no_leak(repr(source), master_key)
    assert texts[0] not in repr(source)
    # several shares in one variable, whitespace separated
    assert SharesKeySource(env=["ALL"], environ={"ALL": "\n".join(texts[:3])}).load() == master_key


@posix_only
def test_shares_insufficient_lists_missing(tmp_path: Path, master_key: MasterKey) -> None:
    texts = split_master_key(master_key, shares=3, threshold=2)
    path = write(tmp_path / "share1", texts[0])
    source = SharesKeySource(files=[path, tmp_path / "share2"], env=["S3"], environ={})
    with pytest.raises(KeySourceError, match="need 2 shares") as info:
        source.load()
    assert "share2" in str(info.value)
    assert "$S3" in str(info.value)
    with pytest.raises(KeySourceError, match="no key shares found"):
        SharesKeySource(env=["S3"], environ={}).load()
    with pytest.raises(KeySourceError, match="none configured"):
        SharesKeySource().load()


@posix_only
def test_share_file_permissions_checked(tmp_path: Path, master_key: MasterKey) -> None:
    texts = split_master_key(master_key, shares=3, threshold=2)
    a = write(tmp_path / "a", texts[0])
    b = write(tmp_path / "b", texts[1], 0o644)
    with pytest.raises(KeySourceError, match="group or others"):
        SharesKeySource(files=[a, b]).load()


def test_damaged_share_names_its_origin(master_key: MasterKey) -> None:
    texts = split_master_key(master_key, shares=3, threshold=2)
    damaged = texts[1][:-1] + ("0" if texts[1][-1] != "0" else "1")
    source = SharesKeySource(env=["S1", "S2"], environ={"S1": texts[0], "S2": damaged})
    with pytest.raises(
        KeySourceError, match="environment variable S2: share #2 is damaged"
    ) as info:
        source.load()
    assert damaged not in str(info.value)
    assert_no_leak(str(info.value), master_key)


def test_wrong_share_set(master_key: MasterKey) -> None:
    first = split_master_key(master_key, shares=3, threshold=2)
    second = split_master_key(master_key, shares=3, threshold=2)
    source = SharesKeySource(env=["S1", "S2"], environ={"S1": first[0], "S2": second[1]})
    with pytest.raises(KeySourceError, match="do not reconstruct a valid key"):
        source.load()
