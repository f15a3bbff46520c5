"""Area E: deterministic solver checks (in progress)."""
