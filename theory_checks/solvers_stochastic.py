"""Sampler order checks (placeholder)."""
