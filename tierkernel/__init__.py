"""tierkernel: a Jupyter kernel for Python in which each cell chooses how far it is trusted."""

__version__ = "0.1.0"
