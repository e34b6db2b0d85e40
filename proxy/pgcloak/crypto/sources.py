"""Where the master key comes from: one small interface, several sources.

A :class:`KeySource` has one method, ``load() -> MasterKey``; the CLI picks a
source from configuration and calls it once at start-up. Errors are
:class:`KeySourceError` naming the source (variable name, file path), never
its content.

Files (key or shares) must not be accessible to group or others
(``chmod 600``/``400``), as ssh demands of private keys; ``allow_group_readable``
relaxes that to group *read* for Kubernetes secret volumes mounted with
``fsGroup`` and ``defaultMode: 0440``. The mode is checked on the opened file
descriptor, so a swapped path cannot pass the check and then be read.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, runtime_checkable

from .errors import KeyMaterialError, KeySourceError
from .keys import MasterKey, combine_shares, master_key_from_text, parse_share

DEFAULT_ENV_VAR: Final = "PGCLOAK_MASTER_KEY"
_MAX_FILE_BYTES: Final = 64 * 1024
_CHECK_MODES: Final = os.name == "posix"

StrPath = str | os.PathLike[str]


@runtime_checkable
class KeySource(Protocol):
    """Anything that can produce the master key."""

    def load(self) -> MasterKey: ...


class KmsClient(Protocol):
    """Placeholder for a KMS that unwraps (decrypts) a wrapped master key.

    An implementation (AWS KMS ``Decrypt``, GCP ``decrypt``, Vault transit,
    ...) returns the 32 plaintext key bytes for the wrapped blob; ``context``
    is the encryption context / AAD the key was wrapped with. No
    implementation ships yet.
    """

    def unwrap(self, wrapped_key: bytes, *, context: Mapping[str, str]) -> bytes: ...


class KmsKeySource(Protocol):
    """Placeholder for a key source backed by a :class:`KmsClient`."""

    client: KmsClient
    wrapped_key: bytes

    def load(self) -> MasterKey: ...


def read_secret_file(path: StrPath, *, allow_group_readable: bool = False) -> str:
    """Text of a key or share file after checking that only its owner can use it."""
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KeySourceError(f"key file {name} does not exist") from None
    except OSError as exc:
        raise KeySourceError(f"cannot open key file {name}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeySourceError(f"key file {name} is not a regular file")
        if _CHECK_MODES:
            forbidden = 0o037 if allow_group_readable else 0o077
            if info.st_mode & forbidden:
                wanted = (
                    "0600/0400 (or 0440 where allowed)" if allow_group_readable else "0600 or 0400"
                )
                raise KeySourceError(
                    f"key file {name} is accessible by group or others "
                    f"(mode {stat.S_IMODE(info.st_mode):04o}); chmod it to {wanted}"
                )
        with os.fdopen(fd, "rb", closefd=True) as handle:
            fd = -1
            data = handle.read(_MAX_FILE_BYTES + 1)
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > _MAX_FILE_BYTES:
        raise KeySourceError(f"key file {name} is larger than {_MAX_FILE_BYTES} bytes")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise KeySourceError(f"key file {name} does not contain key text (non-ASCII)") from None


@dataclass(frozen=True)
class EnvKeySource:
    """The master key as base64 or hex text in an environment variable."""

    name: str = DEFAULT_ENV_VAR
    environ: Mapping[str, str] | None = field(default=None, repr=False, compare=False)

    def load(self) -> MasterKey:
        environ = os.environ if self.environ is None else self.environ
        text = environ.get(self.name)
        if text is None or not text.strip():
            raise KeySourceError(f"environment variable {self.name} is not set")
        try:
            return master_key_from_text(text)
        except KeyMaterialError as exc:
            raise KeySourceError(f"environment variable {self.name}: {exc}") from None


@dataclass(frozen=True)
class FileKeySource:
    """The master key as base64 or hex text in a file only its owner can read."""

    path: StrPath
    allow_group_readable: bool = False

    def load(self) -> MasterKey:
        text = read_secret_file(self.path, allow_group_readable=self.allow_group_readable)
        try:
            return master_key_from_text(text)
        except KeyMaterialError as exc:
            raise KeySourceError(f"key file {os.fspath(self.path)}: {exc}") from None


@dataclass(frozen=True)
class SharesKeySource:
    """k-of-n Shamir shares, one or more per file or environment variable.

    Each file or variable holds share texts separated by whitespace
    (typically one). Missing files and unset variables are skipped, since
    k-of-n exists to tolerate absent shares; they are listed in the error if
    too few shares remain. Unsafe permissions are always an error.
    """

    files: Sequence[StrPath] = ()
    env: Sequence[str] = ()
    environ: Mapping[str, str] | None = field(default=None, repr=False, compare=False)
    allow_group_readable: bool = False

    def load(self) -> MasterKey:
        environ = os.environ if self.environ is None else self.environ
        texts: list[str] = []
        origins: list[str] = []
        missing: list[str] = []
        for path in self.files:
            name = os.fspath(path)
            if not os.path.lexists(name):
                missing.append(name)
                continue
            for text in read_secret_file(
                path, allow_group_readable=self.allow_group_readable
            ).split():
                texts.append(text)
                origins.append(f"file {name}")
        for var in self.env:
            value = environ.get(var)
            if value is None or not value.strip():
                missing.append(f"${var}")
                continue
            for text in value.split():
                texts.append(text)
                origins.append(f"environment variable {var}")
        if not texts:
            raise KeySourceError(
                f"no key shares found (missing: {', '.join(missing) or 'none configured'})"
            )
        for position, (text, origin) in enumerate(zip(texts, origins, strict=True), start=1):
            try:
                parse_share(text, position)
            except KeyMaterialError as exc:
                raise KeySourceError(f"{origin}: {exc}") from None
        try:
            return combine_shares(texts)
        except KeyMaterialError as exc:
            suffix = f" (missing: {', '.join(missing)})" if missing else ""
            raise KeySourceError(f"{exc}{suffix}") from None
