"""The ``remote`` tier: cells run on a ``tierkernel serve`` elsewhere (see ``backend.py``)."""
