"""pgcloak.sql."""
