"""The ``sandbox`` tier: cells run in a hardened Linux container (see backend.py)."""
