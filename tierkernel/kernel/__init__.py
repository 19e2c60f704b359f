"""The kernel: TierKernel, its launcher and kernelspec installation."""
