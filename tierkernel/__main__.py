"""``python -m tierkernel``: launch the kernel (what the kernelspec's argv runs)."""

from tierkernel.backends.sandbox import head_start as sandbox_head_start

# First of all, while this is the only thread: the sandbox tier's head start imports in a
# helper on the other core while this process imports ipykernel (see sandbox_head_start).
sandbox_head_start.fork_early()

from tierkernel.kernel.app import main  # noqa: E402 - after the fork, on purpose

if __name__ == "__main__":
    main()
