"""pgcloak.inject."""
