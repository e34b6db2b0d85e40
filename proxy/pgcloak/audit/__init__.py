"""pgcloak.audit."""
