"""pgcloak.admin."""
