"""Launching the kernel: ``python -m tierkernel -f CONNECTION_FILE``."""

from __future__ import annotations

from ipykernel.kernelapp import IPKernelApp

from tierkernel.kernel.kernel import TierKernel


def main() -> None:
    """Start TierKernel under ipykernel's application (what the kernelspec runs)."""
    IPKernelApp.launch_instance(kernel_class=TierKernel)
