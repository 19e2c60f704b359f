"""``python -m tierkernel``: launch the kernel (what the kernelspec's argv runs)."""

import sys

from tierkernel.backends import early
from tierkernel.kernel import early_sockets

# First of all, while this is the only thread: the tiers' early work runs beside the kernel's
# imports (see tierkernel/backends/early.py).
early.begin()
# Then, before the imports, the sockets a client's first requests arrive on, so that it
# connects at once and its requests wait for the kernel (see tierkernel/kernel/early_sockets.py).
early_sockets.bind(sys.argv[1:])

from tierkernel.kernel.app import main  # noqa: E402 - after the early work and sockets, on purpose

if __name__ == "__main__":
    main()
