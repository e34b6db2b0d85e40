"""pgcloak.demo."""
