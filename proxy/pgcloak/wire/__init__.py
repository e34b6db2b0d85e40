"""pgcloak.wire."""
