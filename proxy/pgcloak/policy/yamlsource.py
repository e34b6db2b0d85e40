"""YAML to plain data, remembering where every key and value came from.

PyYAML's ``safe_load`` forgets positions and lets a repeated key silently replace
the first one (in a policy, that can quietly drop a column's protection). So the
document is composed into a node tree and converted here, recording the position
of every key and value by its location in the document, and refusing duplicates.

Mapping keys are always taken as written (strings): ``on:``, ``no:`` or ``1:`` name a
column or role, they are not booleans or numbers. Anchors, aliases and ``<<`` merge
keys work as in YAML 1.1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.error import Mark, MarkedYAMLError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from pgcloak.policy.errors import Loc

MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_COLLECTION_TAGS = frozenset({"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"})
_MAX_DEPTH = 64
# libyaml is ~25x faster and reports the same positions; PyYAML's pure-Python
# loader is the fallback where the C extension is not built.
_LOADER: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = getattr(
    yaml, "CSafeLoader", yaml.SafeLoader
)
#: Values reached again through aliases; a real policy stays far below, an alias
#: bomb ("billion laughs") hits it within milliseconds.
_MAX_ALIAS_EXPANSIONS = 10_000


@dataclass(frozen=True, slots=True)
class Position:
    """1-based line and column."""

    line: int
    column: int

    @classmethod
    def of(cls, mark: Mark | None) -> Position | None:
        if mark is None:
            return None
        return cls(mark.line + 1, mark.column + 1)


@dataclass(slots=True)
class Located:
    """Plain data plus the position of each value and each mapping key, by location."""

    data: Any
    values: dict[Loc, Position] = field(default_factory=dict)
    keys: dict[Loc, Position] = field(default_factory=dict)

    def position(self, loc: Loc, *, at_key: bool = False) -> Position | None:
        """Where ``loc`` is; falls back to the nearest enclosing value that exists."""
        if at_key and loc in self.keys:
            return self.keys[loc]
        for end in range(len(loc), -1, -1):
            found = self.values.get(loc[:end])
            if found is not None:
                return found
        return None


class YamlProblem(Exception):
    """The YAML cannot be turned into data; ``position`` says where."""

    def __init__(self, reason: str, position: Position | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.position = position


def load_located(text: str) -> Located:
    """Parse one YAML document. Raises :class:`YamlProblem` for syntax and structure errors."""
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except RecursionError:
        raise YamlProblem(_TOO_DEEP, Position(1, 1)) from None
    except yaml.YAMLError as fast_error:
        # Errors are rare: redo them with the pure-Python loader, whose messages and
        # positions (characters, not UTF-8 bytes) do not depend on libyaml.
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except RecursionError:
            # libyaml stops at its nesting limit; the pure-Python loader recurses until
            # Python's limit: libyaml's report is the one to give.
            if isinstance(fast_error, MarkedYAMLError):
                raise YamlProblem(_describe(fast_error), Position.of(fast_error.problem_mark)) from None
            raise YamlProblem(_TOO_DEEP, Position(1, 1)) from None
        except MarkedYAMLError as exc:
            raise YamlProblem(_describe(exc), Position.of(exc.problem_mark)) from None
        except ReaderError as exc:
            position = _offset_position(text, exc.position)
            raise YamlProblem(f"YAML: {exc.reason}", position) from None
        except yaml.YAMLError as exc:  # pragma: no cover - PyYAML raises only the above
            raise YamlProblem(f"YAML: {exc}", None) from None
        raise YamlProblem(f"YAML: {fast_error}", None) from None  # pragma: no cover
    if root is None:
        raise YamlProblem("the policy is empty", Position(1, 1))
    return _Walker().run(root)


_TOO_DEEP = "YAML: the policy nests too deeply to be read"


def _unreadable(node: ScalarNode, exc: Exception) -> str:
    kind = node.tag.rsplit(":", 1)[-1]
    detail = str(exc).replace(node.value, "...") if node.value else str(exc)
    if len(detail) > 120:
        detail = detail[:117] + "..."
    return f"YAML: this {kind} value cannot be read ({detail})"


def _describe(exc: MarkedYAMLError) -> str:
    reason = f"YAML syntax error: {exc.problem}"
    if exc.context:
        reason += f" ({exc.context}"
        if exc.context_mark is not None:
            reason += f" at line {exc.context_mark.line + 1}"
        reason += ")"
    return reason


def _offset_position(text: str, offset: int) -> Position:
    before = text[:offset]
    line = before.count("\n") + 1
    return Position(line, offset - (before.rfind("\n") + 1) + 1)


class _Walker:
    def __init__(self) -> None:
        self.constructor = SafeConstructor()
        self.located = Located(data=None)
        self.seen: set[int] = set()
        self.expansions = 0

    def run(self, root: Node) -> Located:
        self.located.values[()] = _pos(root)
        self.located.data = self.walk(root, ())
        return self.located

    def fail(self, reason: str, node: Node) -> YamlProblem:
        return YamlProblem(reason, Position.of(node.start_mark))

    def walk(self, node: Node, loc: Loc) -> Any:
        if id(node) in self.seen:
            self.expansions += 1
            if self.expansions > _MAX_ALIAS_EXPANSIONS:
                raise self.fail("the policy is too large (aliases expand to too many values)", node)
        else:
            self.seen.add(id(node))
        if len(loc) > _MAX_DEPTH:
            raise self.fail("the policy nests too deeply (a recursive alias?)", node)
        if isinstance(node, ScalarNode):
            try:
                return self.constructor.construct_object(node, deep=True)
            except MarkedYAMLError as exc:
                raise YamlProblem(
                    f"YAML: {exc.problem}", Position.of(exc.problem_mark or node.start_mark)
                ) from None
            except (ValueError, TypeError, ArithmeticError) as exc:
                # int() of more than 4300 digits, a timestamp with month 13, ...: the
                # constructors' own errors. The value itself is never repeated.
                raise self.fail(_unreadable(node, exc), node) from None
        if node.tag not in _PLAIN_COLLECTION_TAGS:
            raise self.fail(f"unsupported YAML tag {node.tag!r}", node)
        if isinstance(node, SequenceNode):
            items: list[Any] = []
            for index, child in enumerate(node.value):
                child_loc = (*loc, index)
                self.located.values[child_loc] = _pos(child)
                items.append(self.walk(child, child_loc))
            return items
        if isinstance(node, MappingNode):
            result: dict[str, Any] = {}
            for key_node, value_node in self.pairs(node, 0):
                key = key_node.value
                child_loc = (*loc, key)
                self.located.keys[child_loc] = _pos(key_node)
                self.located.values[child_loc] = _pos(value_node)
                result[key] = self.walk(value_node, child_loc)
            return result
        raise self.fail(f"unexpected YAML node {type(node).__name__}", node)  # pragma: no cover

    def pairs(self, node: MappingNode, depth: int) -> list[tuple[ScalarNode, Node]]:
        """Key/value pairs of a mapping: its own keys first, then keys merged with ``<<``."""
        if depth > _MAX_DEPTH:
            raise self.fail("merge keys nest too deeply (a recursive alias?)", node)
        own: list[tuple[ScalarNode, Node]] = []
        merges: list[Node] = []
        first_seen: dict[str, ScalarNode] = {}
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                merges.append(value_node)
                continue
            if not isinstance(key_node, ScalarNode):
                raise self.fail("mapping keys must be plain names, not lists or mappings", key_node)
            key = key_node.value
            if key in first_seen:
                first = first_seen[key].start_mark
                raise self.fail(
                    f"duplicate key {key!r} (first given at line {first.line + 1}, "
                    f"column {first.column + 1}); YAML would silently keep only the last one",
                    key_node,
                )
            first_seen[key] = key_node
            own.append((key_node, value_node))
        present = set(first_seen)
        for merge in merges:
            sources = merge.value if isinstance(merge, SequenceNode) else [merge]
            for source in sources:
                if not isinstance(source, MappingNode):
                    raise self.fail("'<<' merges a mapping or a list of mappings", source)
                for key_node, value_node in self.pairs(source, depth + 1):
                    if key_node.value not in present:
                        present.add(key_node.value)
                        own.append((key_node, value_node))
        return own


def _pos(node: Node) -> Position:
    return Position(node.start_mark.line + 1, node.start_mark.column + 1)
