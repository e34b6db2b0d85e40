"""pgcloak.session."""
