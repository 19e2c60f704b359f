"""``python -m tierkernel``: launch the kernel (what the kernelspec's argv runs)."""

from tierkernel.backends import early

# First of all, while this is the only thread: the tiers' early work runs beside the kernel's
# imports (see tierkernel/backends/early.py).
early.begin()

from tierkernel.kernel.app import main  # noqa: E402 - after the early work began, on purpose

if __name__ == "__main__":
    main()
