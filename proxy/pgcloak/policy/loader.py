"""Load a policy from YAML: the only IO in this package is reading the file.

Every failure becomes one :class:`PolicyError` whose message reads like a compiler's::

    policies/x.yaml:7:12: tables.public.users.email.index: Input should be 'exact' (got 'exakt')

so that an operator (or the reload log line) sees exactly what to fix.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from pgcloak.policy.compiled import Policy
from pgcloak.policy.errors import (
    Loc,
    LocatedProblem,
    PolicyError,
    PolicyInvalid,
    PolicyIssue,
    format_loc,
)
from pgcloak.policy.model import READ_MAP_TAG, READ_ONE_TAG, PolicyModel
from pgcloak.policy.yamlsource import Located, YamlProblem, load_located


def parse_policy(text: str, source: str = "<string>") -> Policy:
    """Parse and validate a YAML policy. Raises :class:`PolicyError`, and only that."""
    try:
        try:
            located = load_located(text)
        except YamlProblem as exc:
            pos = exc.position
            raise PolicyError(
                source,
                [PolicyIssue("", exc.reason, pos.line if pos else None, pos.column if pos else None)],
            ) from None
        return _build(located, source)
    except PolicyError:
        raise
    except Exception as exc:  # whatever else fails, the policy is refused
        raise _unexpected(source, exc) from None


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and validate a policy file. Raises :class:`PolicyError` (also for IO errors)."""
    return policy_from_bytes(read_policy_file(path), os.fspath(path))


def read_policy_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a policy file. Raises :class:`PolicyError` when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        reason = f"cannot read the policy: {exc.strerror or exc}"
        raise PolicyError(os.fspath(path), [PolicyIssue("", reason)]) from None
    except Exception as exc:  # MemoryError, a path that is not one, ...
        raise _unexpected(os.fspath(path), exc) from None


def policy_from_bytes(raw: bytes, source: str) -> Policy:
    """Decode (UTF-8, optional BOM) and validate a policy. Raises :class:`PolicyError`."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        before = raw[: exc.start]
        line = before.count(b"\n") + 1
        column = exc.start - (before.rfind(b"\n") + 1) + 1
        raise PolicyError(
            source, [PolicyIssue("", "the policy is not valid UTF-8", line, column)]
        ) from None
    return parse_policy(text, source)


def _unexpected(source: str, exc: BaseException) -> PolicyError:
    """A failure the loader has no better words for; its message is not repeated (the
    policy may name a sink with a password), only its kind."""
    if isinstance(exc, RecursionError):
        reason = "the policy nests too deeply to be read"
    elif isinstance(exc, MemoryError):
        reason = "the policy is too large to be read"
    else:
        reason = f"the policy cannot be read ({type(exc).__name__})"
    return PolicyError(source, [PolicyIssue("", reason)])


def load_policy_or_keep(
    path: str | os.PathLike[str], current: Policy | None
) -> tuple[Policy | None, PolicyError | None]:
    """For reloads: ``(new, None)`` on success, ``(current, error)`` when the file is bad.

    A running proxy keeps serving with the last good policy and logs the error.
    """
    try:
        return load_policy(path), None
    except PolicyError as exc:
        return current, exc


def policy_from_mapping(data: Mapping[str, Any], source: str = "<mapping>") -> Policy:
    """Validate a policy given as plain data (tests, generated policies). No positions."""
    return _build(Located(data=dict(data)), source)


def _build(located: Located, source: str) -> Policy:
    try:
        model = PolicyModel.model_validate(located.data)
    except ValidationError as exc:
        problems = [_from_pydantic(error) for error in exc.errors()]
        raise _policy_error(source, located, problems) from None
    try:
        return Policy(model, source=source)
    except PolicyInvalid as exc:
        raise _policy_error(source, located, exc.problems) from None


def _policy_error(
    source: str, located: Located, problems: typing.Sequence[LocatedProblem]
) -> PolicyError:
    issues = []
    for problem in problems:
        pos = located.position(problem.loc, at_key=problem.at_key)
        issues.append(
            PolicyIssue(
                format_loc(problem.loc),
                problem.reason,
                pos.line if pos else None,
                pos.column if pos else None,
            )
        )
    issues.sort(key=lambda i: (i.line or 0, i.column or 0))
    return PolicyError(source, issues)


# -- pydantic errors -> located problems ------------------------------------------------


def _from_pydantic(error: ErrorDetails) -> LocatedProblem:
    loc: Loc = tuple(error["loc"])
    kind = error["type"]
    read_form = None
    # roles.<role>.read.<union tag>...: the tag is pydantic's, not the user's.
    if len(loc) >= 4 and loc[0] == "roles" and loc[2] == "read" and loc[3] in _READ_TAGS:
        read_form = loc[3]
        loc = loc[:3] + loc[4:]
    if kind == "extra_forbidden":
        return LocatedProblem(loc, _unknown_key_reason(loc), at_key=True)
    if kind == "missing":
        return LocatedProblem(loc, "required key is missing")
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return LocatedProblem(loc, f"expected a mapping, got {_describe(error['input'])}")
    message = error["msg"]
    if read_form == READ_ONE_TAG and kind == "literal_error":
        message += ", or a mapping from columns to one of those"
    if kind.endswith("_type") or kind in ("literal_error", "enum"):
        message += f" (got {_describe(error['input'])})"
    return LocatedProblem(loc, message)


_READ_TAGS = (READ_ONE_TAG, READ_MAP_TAG)


def _unknown_key_reason(loc: Loc) -> str:
    key = str(loc[-1])
    reason = f"unknown key {key!r}"
    allowed = _model_fields_at(loc[:-1])
    if allowed:
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        if close:
            reason += f"; did you mean {close[0]!r}?"
        reason += f" (allowed: {', '.join(allowed)})"
    return reason


def _model_fields_at(loc: Loc) -> list[str] | None:
    """Field names of the model found at ``loc``, walking the annotations from the root."""
    current: Any = PolicyModel
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            info = current.model_fields.get(str(part))
            if info is None:
                return None
            current = info.annotation
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        else:
            return None
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated`` and ``X | None`` down to the model or container type."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
            if len(models) == 1:
                return models[0]
            return annotation
        else:
            return annotation


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return repr(shown)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__
