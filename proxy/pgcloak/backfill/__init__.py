"""Existing values brought to the policy's stored form (`pgcloak backfill`).

``convert`` decides per value (pure); ``runner`` reads and writes PostgreSQL in batches;
``trail`` records the run in the audit trail; ``command`` is the CLI.
"""

from pgcloak.backfill.convert import ColumnJob, Converter, ConvertError, column_jobs

__all__ = ["ColumnJob", "ConvertError", "Converter", "column_jobs"]
