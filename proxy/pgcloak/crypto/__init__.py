"""pgcloak.crypto."""
