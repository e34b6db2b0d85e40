"""pgcloak: a PostgreSQL privacy proxy."""

__version__ = "0.1.0"
