"""pgcloak.policy."""
