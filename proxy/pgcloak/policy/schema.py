"""Print the policy JSON Schema: ``python -m pgcloak.policy.schema > policies/policy.schema.json``.

``policies/policy.schema.json`` is this output, checked in for editors and CI; a unit
test fails when the two drift. The generator lives in :mod:`.schemagen` so that
importing :mod:`pgcloak.policy` does not import this module (``python -m`` warns then).
"""

from __future__ import annotations

import sys

from pgcloak.policy.schemagen import schema_dict, schema_json

__all__ = ["main", "schema_dict", "schema_json"]


def main() -> int:
    sys.stdout.write(schema_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
