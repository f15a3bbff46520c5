"""Area E (stochastic): SDE solver checks (in progress)."""
