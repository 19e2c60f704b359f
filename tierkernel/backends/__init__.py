"""Tiers: the backend contract (base.py), the registry, and one module per built-in tier."""
