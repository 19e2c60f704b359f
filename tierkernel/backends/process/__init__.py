"""The ``process`` tier: cells run in a host child process under the agent (see backend.py)."""
