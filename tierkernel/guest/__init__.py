"""Code that runs inside a tier's guest. Standard library only: it must run in any image."""
