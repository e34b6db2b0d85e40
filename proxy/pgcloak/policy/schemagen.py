"""The policy JSON Schema, generated from the pydantic model (see :mod:`.schema`).

``policies/policy.schema.json`` is this output, checked in for editors and CI; a
unit test fails when the two drift. Regenerate with::

    python -m pgcloak.policy.schema > policies/policy.schema.json
"""

from __future__ import annotations

import json
from typing import Any

from pgcloak.policy.model import PolicyModel


def schema_dict() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a policy document."""
    schema = PolicyModel.model_json_schema()
    _close_pattern_objects(schema)
    return schema


def schema_json() -> str:
    """:func:`schema_dict` as stable, pretty-printed JSON with a trailing newline."""
    return json.dumps(schema_dict(), indent=2, ensure_ascii=False) + "\n"


def _close_pattern_objects(node: Any) -> None:
    # pydantic emits patternProperties for keys with a pattern but leaves other keys
    # allowed; a key that matches no pattern is a mistake, as the loader says.
    if isinstance(node, dict):
        if "patternProperties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _close_pattern_objects(value)
    elif isinstance(node, list):
        for value in node:
            _close_pattern_objects(value)
